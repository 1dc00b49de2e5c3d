"""`python -m benchmarks [--quick] [names...]`: run benchmarks, then print a summary table.

Names are modules of this package (default: all of them). A benchmark that crashes is
reported in the table and makes the exit status 1; slow figures never do.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence

from benchmarks import BENCHMARKS

#: figure -> target, for the summary table.
_TARGETS: dict[str, str] = {
    "sequential_msg_per_s": ">= 20,000",
    "concurrent_msg_per_s": ">= 20,000",
    "sequential_msg_per_cpu_s": ">= 20,000",
    "concurrent_msg_per_cpu_s": ">= 20,000",
    "save_to_reply_median_ms": "< 200",
    "start_median_s": "< 0.5",
    "restart_median_s": "< 0.5",
    "rss_median_mib": "< 60",
    "kernel_vs_bare": ">= 0.70",
    "kernel_vs_bare_per_cpu": ">= 0.70",
    "kernel_non_200": "0",
    "delivered_per_sub_min_per_s": ">= 10,000",
    "handling_median_loaded_vs_idle": "<= 1.10",
    "e2e_median_loaded_vs_idle": "<= 1.10",
    "e2e_median_loaded_vs_nosub": "<= 1.10",
}
_UNITS = (
    ("_msg_per_cpu_s", "msg/CPU-s"),
    ("_msg_per_s", "msg/s"),
    ("_req_per_cpu_s", "req/CPU-s"),
    ("_req_per_s", "req/s"),
    ("_per_s", "/s"),
    ("_vs_baseline", "ratio"),
    ("_vs_bare", "ratio"),
    ("_vs_bare_per_cpu", "ratio"),
    ("_vs_idle", "ratio"),
    ("_us", "µs"),
    ("_ms", "ms"),
    ("_mib", "MiB"),
)


def _unit(key: str) -> str:
    for suffix, unit in _UNITS:
        if key.endswith(suffix):
            return unit
    return "s" if key.endswith("_s") else ""


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named benchmarks (all by default) and print their figures and a summary."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny runs (a smoke test)")
    opts = parser.parse_args(argv)
    names = opts.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {BENCHMARKS}")
    sub_argv = ["--quick"] if opts.quick else []

    results: dict[str, dict[str, float] | str] = {}
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        try:
            results[name] = module.main(sub_argv)
        except Exception as exc:
            traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0]
            results[name] = f"FAILED: {type(exc).__name__}: {first_line}"
        print(f"({name} took {time.perf_counter() - start:.1f} s)\n", flush=True)

    rows = [("benchmark", "figure", "value", "unit", "target")]
    failures = []
    for name, figures in results.items():
        if isinstance(figures, str):
            failures.append(f"{name}: {figures}")
            continue
        for key, value in figures.items():
            rows.append((name, key, _fmt(value), _unit(key), _TARGETS.get(key, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print("== summary ==")
    for i, row in enumerate(rows):
        cells = [
            cell.rjust(w) if col == 2 else cell.ljust(w)
            for col, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for failure in failures:
        print(failure)
    return 1 if any(isinstance(f, str) for f in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
