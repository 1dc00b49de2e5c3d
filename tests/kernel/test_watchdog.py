"""Tests of kernel.watchdog: a blocked event loop is noticed and blamed on its plugin."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from kernel.testing import MockBot, record_logs, running_kernel
from kernel.watchdog import LoopWatchdog
from tests.plugin_factory import write_plugin

_BLOCKER = """
import time

from kernel import CommandSpec, hookimpl


def _work(watchdog):
    # Blocks the loop on purpose (that is what is tested), until the watchdog's thread
    # has noticed: however long a loaded machine makes that take, not a fixed while.
    deadline = time.monotonic() + 30
    while not any(p == "wd_blocker" for p, _ in watchdog.stalls):
        assert time.monotonic() < deadline, "the watchdog never noticed"
        time.sleep(0.01)


async def block(cmd):
    _work(cmd.ctx.kernel.watchdog)
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
        records = record_logs(kernel)
        bot = MockBot(kernel)
        assert await bot.receive("/fine") == ["fine"]
        # (A busy machine may stall the loop anywhere; only the plugin must not be blamed.)
        assert "wd_blocker" not in [p for p, _ in kernel.watchdog.stalls]
        assert await bot.receive("/block") == ["blocked"]
        [seconds] = [s for p, s in kernel.watchdog.stalls if p == "wd_blocker"]
        assert seconds >= 0.2
        # Logged by the watching thread right after it recorded the stall.
        record = await records.wait_for(
            lambda r: r.level == "WARNING" and "blocked" in r.message and r.plugin is not None
        )
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
            await anyio.lowlevel.checkpoint()  # the heartbeat and its thread start
            # Blocks the loop on purpose, until the watching thread has reported it.
            done.wait(30)
            tg.cancel_scope.cancel()
        dog.stop()

    anyio.run(main)
    assert done.is_set()
    assert dog.stalls and dog.stalls[0][0] is None
    assert reports[0][0] is None and "blocked" in reports[0][1]
