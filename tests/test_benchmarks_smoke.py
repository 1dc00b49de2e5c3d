"""Each benchmark runs in its tiny `--quick` mode and returns sane figures.

No assertion is about speed: these only prove the benchmarks still work.
"""

from __future__ import annotations

import math
import os

import pytest

from benchmarks import (
    BENCHMARKS,
    api_http,
    dispatch,
    hot_reload,
    logs_fanout,
    percentile,
    pinned_to_one_core,
    startup,
)
from benchmarks import __main__ as bench_main


def _all_positive(figures: dict[str, float], keys: set[str]) -> None:
    assert keys <= figures.keys()
    for key in keys:
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([10.0, 0.0], 90) == pytest.approx(9.0)
    assert percentile([7.0], 90) == 7.0
    assert math.isnan(percentile([], 50))


def test_pinning_restores_affinity() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    with pinned_to_one_core() as note:
        if note.startswith("pinned"):
            assert len(os.sched_getaffinity(0)) == 1
    assert os.sched_getaffinity(0) == before


def test_dispatch_quick_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main.main(["--quick", "dispatch"]) == 0
    out = capsys.readouterr().out
    assert "== dispatch:" in out
    assert "== summary ==" in out
    assert "sequential_msg_per_s" in out


def test_dispatch_quick_figures(capsys: pytest.CaptureFixture[str]) -> None:
    figures = dispatch.main(["--quick", "--no-pin"])
    for scenario in dispatch.SCENARIOS:
        _all_positive(
            figures,
            {
                f"{scenario}_msg_per_s",
                f"{scenario}_msg_per_cpu_s",
                f"{scenario}_baseline_msg_per_cpu_s",
                f"{scenario}_vs_baseline",
            },
        )
    assert not [key for key in figures if key.startswith("_")]
    assert "not pinned (--no-pin)" in capsys.readouterr().out


def test_hot_reload_quick() -> None:
    figures = hot_reload.main(["--quick", "--debounce-ms", "20"])
    _all_positive(
        figures,
        {"save_to_reply_median_ms", "save_to_reply_p90_ms", "save_to_reply_max_ms"},
    )
    _all_positive(figures, {"reload_op_median_ms"})
    assert figures["save_to_reply_max_ms"] >= figures["save_to_reply_median_ms"]


def test_startup_quick() -> None:
    figures = startup.main(["--quick"])
    _all_positive(figures, {"start_median_s", "stop_median_s"})
    if os.path.exists("/proc/self/status"):
        _all_positive(figures, {"rss_median_mib"})


def test_api_http_quick(capsys: pytest.CaptureFixture[str]) -> None:
    figures = api_http.main(["--quick"])
    _all_positive(
        figures,
        {
            "bare_req_per_s",
            "kernel_req_per_s",
            "kernel_vs_bare",
            "bare_req_per_cpu_s",
            "kernel_req_per_cpu_s",
        },
    )
    # Authenticated, under the raised rate limit: every answer was a 200.
    assert figures["kernel_non_200"] == 0
    assert figures["bare_non_200"] == 0
    assert "== api_http:" in capsys.readouterr().out


def test_logs_fanout_quick(capsys: pytest.CaptureFixture[str]) -> None:
    figures = logs_fanout.main(["--quick"])
    _all_positive(
        figures,
        {
            "emitted_records_per_s",
            "delivered_per_sub_min_per_s",
            "delivered_total_per_s",
            "record_cost_alone_us",
            "record_cost_subscribed_us",
            "idle_handling_median_ms",
            "loaded_handling_median_ms",
            "idle_arrival_median_ms",
            "loaded_arrival_median_ms",
            "handling_median_loaded_vs_idle",
            "arrival_median_loaded_vs_idle",
            "idle_e2e_median_ms",
            "loaded_e2e_median_ms",
            "e2e_median_loaded_vs_idle",
        },
    )
    assert 0 < figures["delivered_fraction"] <= 1
    assert "== logs_fanout:" in capsys.readouterr().out


def test_unknown_benchmark_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        bench_main.main(["no_such_benchmark"])
    assert info.value.code == 2
    assert "dispatch" in BENCHMARKS
