"""The kernel's log records: ring buffer, JSON-lines file, attribution, other kernels."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from kernel.logs import KernelLogHandler, RepeatFilter, read_log_file
from kernel.testing import running_kernel

pytestmark = pytest.mark.anyio


async def test_records_reach_buffer_and_file_and_are_read_back(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "a") as a, running_kernel(tmp_path / "b") as b:
        a.log.warning("only in a %d", 1)
        b.log.warning("only in b")
        assert any(r.message == "only in a 1" for r in a.logging.buffer.records)
        assert not any(r.message == "only in b" for r in a.logging.buffer.records)
        seqs = [r.seq for r in a.logging.buffer.records]
        assert seqs == sorted(seqs)
    # The kernels are stopped: their files are complete.
    lines = (tmp_path / "a" / "logs" / "nekobot.log").read_text().splitlines()
    assert all(json.loads(line)["level"] for line in lines)
    records = read_log_file(tmp_path / "a" / "logs" / "nekobot.log")
    mine = [r for r in records if r.message == "only in a 1"]
    assert len(mine) == 1
    assert mine[0].level == "WARNING"
    assert mine[0].seq > 0
    assert not any(r.message == "only in b" for r in records)


async def test_numbering_goes_on_across_restarts(tmp_path: Path) -> None:
    # The file keeps earlier runs, and `seq` is what orders its records.
    async with running_kernel(tmp_path / "data") as kernel:
        kernel.log.warning("first run")
    async with running_kernel(tmp_path / "data") as kernel:
        kernel.log.warning("second run")
        first = kernel.logging.buffer.records[0].seq
    seqs = [r.seq for r in read_log_file(tmp_path / "data" / "logs" / "nekobot.log")]
    assert first > 1
    assert seqs == sorted(set(seqs))


def test_read_log_file_tolerates_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    good = {
        "seq": 3,
        "time": 1.5,
        "level": "INFO",
        "logger": "nekobot.x",
        "plugin": "p",
        "message": "hello",
    }
    path.write_text("2024 old text format line\n" + json.dumps(good) + '\n{"seq": 4, "ti')
    records = read_log_file(path)
    assert [(r.seq, r.message, r.plugin) for r in records] == [(3, "hello", "p")]
    assert read_log_file(tmp_path / "missing.log") == []
    assert len(read_log_file(path, max_records=0)) == 0


async def test_level_setting_applies_live(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as kernel:
        await kernel.update_settings(log_level="ERROR")
        assert logging.getLogger("nekobot").level == logging.ERROR
        kernel.log.warning("hidden")
        assert not any(r.message == "hidden" for r in kernel.logging.buffer.records)
        await kernel.update_settings(log_level="INFO")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    msg: str, *args: object, name: str = "nekobot.x", level: int = logging.ERROR
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeated_records_collapse_into_one_suppressed_line() -> None:
    clock = FakeClock()
    handler = KernelLogHandler("k", 100, RepeatFilter(3, 10.0, clock=clock))
    for i in range(50):
        handler.handle(record("accept failed on fd %d", i))  # one template, many arguments
    handler.handle(record("something else"))
    assert [r.message for r in handler.records] == [
        "accept failed on fd 0",
        "accept failed on fd 1",
        "accept failed on fd 2",
        "something else",
    ]
    clock.now += 9.9
    handler.handle(record("accept failed on fd %d", 99))
    assert len(handler.records) == 4  # still the same interval
    clock.now += 0.1
    handler.handle(record("accept failed on fd %d", 100))
    assert [r.message for r in list(handler.records)[4:]] == [
        "suppressed 48 similar messages in 10 s: accept failed on fd %d",
        "accept failed on fd 100",
    ]
    summary = handler.records[4]
    assert (summary.logger, summary.level) == ("nekobot.x", "ERROR")


def test_the_summary_comes_with_the_next_record_of_any_kind() -> None:
    clock = FakeClock()
    handler = KernelLogHandler("k", 100, RepeatFilter(1, 5.0, clock=clock))
    for _ in range(3):
        handler.handle(record("flood"))
    clock.now += 5
    handler.handle(record("quiet again", level=logging.INFO))
    assert [r.message for r in handler.records] == [
        "flood",
        "suppressed 2 similar messages in 5 s: flood",
        "quiet again",
    ]


def test_kinds_differ_by_logger_and_level() -> None:
    handler = KernelLogHandler("k", 100, RepeatFilter(1, 10.0, clock=FakeClock()))
    handler.handle(record("same"))
    handler.handle(record("same", level=logging.WARNING))
    handler.handle(record("same", name="nekobot.y"))
    handler.handle(record("same"))
    assert len(handler.records) == 3


def test_the_filter_serves_any_handler() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.addFilter(RepeatFilter(2, 1.0, report=console.handle, clock=clock))
    for _ in range(1000):
        console.handle(record("EMFILE"))
    clock.now += 1
    console.handle(record("EMFILE"))
    assert stream.getvalue().splitlines() == [
        "EMFILE",
        "EMFILE",
        "suppressed 998 similar messages in 1 s: EMFILE",
        "EMFILE",
    ]


async def test_a_kernel_collapses_floods(tmp_path: Path) -> None:
    async with running_kernel(tmp_path, log_repeat_limit=5) as kernel:
        for i in range(1000):
            kernel.log.warning("half-open connection %d", i)
        flood = [r for r in kernel.logging.buffer.records if "half-open" in r.message]
        assert len(flood) == 5
