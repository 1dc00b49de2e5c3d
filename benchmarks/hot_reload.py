"""Hot reload latency: from saving a plugin file to the first reply of the new version.

A kernel with `hot_reload=True` watches a plugin directory holding a small plugin
whose command `/zzver` answers its version string. Each round writes a new version the
way editors save (a temporary file, then `os.replace`), then asks `/zzver` through a
MockBot every millisecond or so until the answer is the new version. Separately, the
reload operation alone (`kernel.plugins.reload`, no file watching) is timed.

Run: `python -m benchmarks.hot_reload [--rounds N] [--debounce-ms MS] [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from benchmarks import machine_note, median, percentile, verdict

PLUGIN = "zz_bench_reload"
COMMAND = "zzver"
TARGET_MEDIAN_MS = 200.0
#: Give up on one round after this long (a missed change would otherwise hang forever).
ROUND_TIMEOUT_S = 10.0

_SOURCE = '''\
"""Benchmark plugin: answers its version."""

from kernel import CommandSpec, hookimpl

VERSION = "{version}"


async def _version(cmd):
    return VERSION


@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", _version)]
'''


def save(path: Path, text: str) -> None:
    """Write `text` to `path` as editors do: a temporary sibling, then an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_plugin(plugin_dir: Path, version: str) -> Path:
    """Create the benchmark plugin; returns the path of its `__init__.py`."""
    root = plugin_dir / PLUGIN
    root.mkdir(parents=True, exist_ok=True)
    (root / "plugin.toml").write_text(f'name = "{PLUGIN}"\nversion = "1.0"\n', encoding="utf-8")
    init = root / "__init__.py"
    save(init, _SOURCE.format(version=version, command=COMMAND))
    return init


async def _wait_for(bot: Any, expected: str, deadline: float) -> None:
    while True:
        if await bot.receive(f"/{COMMAND}") == [expected]:
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no reply {expected!r} within {ROUND_TIMEOUT_S}s")
        bot.clear()
        await anyio.sleep(0.001)


async def _run(opts: argparse.Namespace) -> dict[str, float]:
    from kernel.testing import MockBot, running_kernel

    with tempfile.TemporaryDirectory(prefix="nekobot-bench-") as tmp:
        root = Path(tmp)
        init = write_plugin(root / "plugins", "v0")
        async with running_kernel(
            root / "data",
            plugin_dirs=[root / "plugins"],
            hot_reload=True,
            reload_debounce_ms=opts.debounce_ms,
        ) as kernel:
            bot = MockBot(kernel)
            await _wait_for(bot, "v0", time.perf_counter() + ROUND_TIMEOUT_S)
            # Let the watcher settle so the initial write is not counted in round 1.
            await anyio.sleep(max(0.2, 3 * opts.debounce_ms / 1000))

            latencies = []
            for i in range(1, opts.rounds + 1):
                version = f"v{i}"
                text = _SOURCE.format(version=version, command=COMMAND)
                start = time.perf_counter()
                save(init, text)
                await _wait_for(bot, version, start + ROUND_TIMEOUT_S)
                latencies.append((time.perf_counter() - start) * 1000)
                bot.clear()
                # Space the saves out as a person would; keeps rounds independent.
                await anyio.sleep(opts.debounce_ms / 1000 + 0.05)

            reloads = []
            for _ in range(opts.rounds):
                start = time.perf_counter()
                await kernel.plugins.reload(PLUGIN)
                reloads.append((time.perf_counter() - start) * 1000)
            if await bot.receive(f"/{COMMAND}") != [f"v{opts.rounds}"]:
                raise RuntimeError("the plugin answers wrongly after the direct reloads")

    return {
        "save_to_reply_median_ms": median(latencies),
        "save_to_reply_p90_ms": percentile(latencies, 90),
        "save_to_reply_max_ms": max(latencies),
        "save_to_reply_min_ms": min(latencies),
        "reload_op_median_ms": median(reloads),
        "reload_op_max_ms": max(reloads),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Measure and print hot-reload latency; returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hot_reload", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="saves to time")
    parser.add_argument("--debounce-ms", type=int, default=50, help="reload_debounce_ms")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds = 2

    figures = anyio.run(_run, opts)
    med = figures["save_to_reply_median_ms"]
    lines = [
        "== hot_reload: save -> first reply of the new version ==",
        f"{machine_note()}; reload_debounce_ms={opts.debounce_ms}, watcher step 20 ms",
        f"{opts.rounds} saves (temp file + os.replace), polled via MockBot every ~1 ms",
        f"  save -> new reply : median {med:7.1f} ms"
        f"   p90 {figures['save_to_reply_p90_ms']:7.1f} ms"
        f"   max {figures['save_to_reply_max_ms']:7.1f} ms"
        f"   min {figures['save_to_reply_min_ms']:7.1f} ms",
        f"  plugins.reload()  : median {figures['reload_op_median_ms']:7.1f} ms"
        f"   max {figures['reload_op_max_ms']:7.1f} ms",
        f"target: median < {TARGET_MEDIAN_MS:.0f} ms ->"
        f" {verdict(med, TARGET_MEDIAN_MS, lower_is_better=True)}",
    ]
    print("\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
