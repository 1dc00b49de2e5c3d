"""The kernel's log records: ring buffer, JSON-lines file, attribution, other kernels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kernel.logs import read_log_file
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
