"""Benchmarks that print measured figures (they never pass or fail on speed).

Run them all with `python -m benchmarks [names...]` (or `nox -s bench`); each module
also runs alone, e.g. `python -m benchmarks.dispatch --quick`. Every module exposes
`main(argv=None) -> dict[str, float]`, which prints a block of figures and targets
and returns the figures for the summary table.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: Benchmark module names, in the order `python -m benchmarks` runs them.
BENCHMARKS: tuple[str, ...] = ("dispatch", "hot_reload", "startup", "api_http", "logs_fanout")


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    """The median of `values` (nan if empty)."""
    return statistics.median(values) if values else float("nan")


@contextmanager
def pinned_to_one_core() -> Iterator[str]:
    """Pin this thread (and threads it starts) to one CPU; yields a note saying what was done.

    Figures from one core are comparable across machines with a different core count;
    the original affinity is restored afterwards.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned (os.sched_setaffinity unavailable on this platform)"
        return
    before = os.sched_getaffinity(0)
    cpu = max(before)  # the highest-numbered CPU tends to be the least busy with IRQs
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        yield f"not pinned ({exc})"
        return
    try:
        yield f"pinned to CPU {cpu} of {len(before)} available"
    finally:
        os.sched_setaffinity(0, before)


def write_bench_plugin(plugin_dir: Path, name: str, source: str, description: str = "") -> Path:
    """Write the directory plugin `plugin_dir/name` with `source` as its `__init__.py`;
    return that file's path."""
    root = plugin_dir / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "1.0"\ndescription = "{description}"\n', encoding="utf-8"
    )
    init = root / "__init__.py"
    init.write_text(source, encoding="utf-8")
    return init


def machine_note() -> str:
    """One line describing the interpreter and machine the figures come from."""
    return (
        f"Python {platform.python_version()} ({sys.implementation.name}), "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )


def verdict(value: float, target: float, *, lower_is_better: bool) -> str:
    """'meets target' / 'MISSES target' (a report, never an assertion)."""
    ok = value <= target if lower_is_better else value >= target
    return "meets target" if ok else "MISSES target"
