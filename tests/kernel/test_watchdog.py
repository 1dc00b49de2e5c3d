"""Tests of kernel.watchdog: a blocked event loop is noticed and blamed on its plugin."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import pytest

from kernel.testing import MockBot, running_kernel
from kernel.watchdog import LoopWatchdog
from tests.plugin_factory import write_plugin

_BLOCKER = """
import time

from kernel import CommandSpec, hookimpl


def _work():
    time.sleep(0.6)


async def block(cmd):
    _work()
    return "blocked"


async def fine(cmd):
    return "fine"


@hookimpl
def nekobot_commands():
    return [CommandSpec("block", block), CommandSpec("fine", fine)]
"""


@pytest.mark.anyio
async def test_a_blocking_handler_is_reported_with_its_plugin(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "wd_blocker", _BLOCKER)
    async with running_kernel(
        tmp_path / "data",
        plugin_dirs=[tmp_path / "plugins"],
        watchdog=True,
        block_threshold=0.2,
    ) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/fine") == ["fine"]
        # (A busy machine may stall the loop anywhere; only the plugin must not be blamed.)
        assert "wd_blocker" not in [p for p, _ in kernel.watchdog.stalls]
        assert await bot.receive("/block") == ["blocked"]
        # The watching thread reports while the loop is still blocked, so the record
        # exists by now; allow it a moment anyway in case the thread was descheduled.
        for _ in range(100):
            if any(p == "wd_blocker" for p, _ in kernel.watchdog.stalls):
                break
            await anyio.sleep(0.05)
        [seconds] = [s for p, s in kernel.watchdog.stalls if p == "wd_blocker"]
        assert seconds >= 0.2
        warnings = [
            r
            for r in kernel.logging.buffer.records
            if r.level == "WARNING" and "blocked" in r.message and r.plugin is not None
        ]
        assert warnings, list(kernel.logging.buffer.records)
        record = warnings[0]
        assert record.plugin == "wd_blocker"
        assert "wd_blocker" in record.message
        # The innermost plugin frame is named, not the kernel's.
        assert "in _work" in record.message
        assert "__init__.py" in record.message


def test_watchdog_unit_blames_unowned_code_as_none() -> None:
    """Without a plugin frame, the stall is reported without a plugin."""
    reports: list[tuple[str | None, str]] = []
    done = threading.Event()

    def report(plugin: str | None, message: str) -> None:
        reports.append((plugin, message))
        done.set()

    dog = LoopWatchdog(0.1, lambda module: None, report)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dog.run)
            await anyio.sleep(0.05)
            time.sleep(0.4)  # noqa: ASYNC251 -- blocks the loop on purpose
            tg.cancel_scope.cancel()
        dog.stop()

    anyio.run(main)
    assert done.is_set()
    assert dog.stalls and dog.stalls[0][0] is None
    assert reports[0][0] is None and "blocked" in reports[0][1]
