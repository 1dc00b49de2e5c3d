"""Tests of kernel.datadir: one running kernel per data directory, in this process or
another, and no stale lock after its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.datadir import DataDirBusyError, DataDirLock
from kernel.testing import running_kernel

pytestmark = pytest.mark.anyio

HOLDER = """
import sys, time
from pathlib import Path
from kernel.datadir import DataDirLock
lock = DataDirLock(Path(sys.argv[1]))
lock.acquire()
lock.announce("http://127.0.0.1:1")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


def hold_elsewhere(data_dir: Path) -> subprocess.Popen[str]:
    """A process that holds `data_dir`'s lock until its stdin closes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "locked\n"
    return proc


async def test_a_second_kernel_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as first:
        with pytest.raises(DataDirBusyError) as caught:
            async with running_kernel(tmp_path / "data"):
                pytest.fail("a second kernel started on the same data directory")
        assert caught.value.holder.pid == os.getpid()
        assert f"(PID {os.getpid()})" in caught.value.message
        # Kernels on other directories are not concerned, and the first one still works.
        async with running_kernel(tmp_path / "other"):
            pass
        assert first.running and first.data_lock.held
    # Let go when the first one stops.
    async with running_kernel(tmp_path / "data") as again:
        assert again.data_lock.held


async def test_a_kernel_of_another_process_is_named_and_nothing_is_touched(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    proc = hold_elsewhere(data)
    try:
        with pytest.raises(DataDirBusyError) as caught:
            async with running_kernel(data):
                pytest.fail("started on a data directory another process holds")
        assert caught.value.holder.pid == proc.pid
        assert caught.value.holder.address == "http://127.0.0.1:1"
        assert f"(PID {proc.pid})" in caught.value.message
        # Refused before the database or the log file were opened.
        assert sorted(p.name for p in data.iterdir()) == ["nekobot.lock"]
    finally:
        proc.communicate("")
    async with running_kernel(data):  # released when the holder exited
        pass


async def test_a_holder_that_dies_leaves_no_stale_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = hold_elsewhere(data)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    async with running_kernel(data) as kernel:
        assert kernel.data_lock.held
        # The file names the new holder, not the dead one.
        assert f'"pid": {os.getpid()}' in (data / "nekobot.lock").read_text()


def test_a_lock_file_that_names_nobody_still_refuses(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        (tmp_path / "nekobot.lock").write_text("not json")  # a holder mid-write, say
        with pytest.raises(DataDirBusyError, match=r"\(another process\)"):
            DataDirLock(tmp_path).acquire()
    finally:
        first.release()
    second = DataDirLock(tmp_path)
    second.acquire()
    second.release()
