"""The lock that gives one kernel at a time a data directory.

Two kernels on one database would each believe their own view of plugins, settings
and accounts. A kernel therefore holds an exclusive `flock` on `<data_dir>/nekobot.lock`
while it runs; the file says who holds it (PID, and the API address once `nekobot run`
serves). The operating system releases the lock when its process dies, so a crashed
bot never leaves a stale lock behind; the file itself stays (removing it would let a
second process lock a fresh file while the first still holds the old one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from kernel.errors import NekoError

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock on Windows: data directories go unlocked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "nekobot.lock"


@attrs.frozen
class LockHolder:
    """Who holds a data directory, as its lock file says (None where it does not say)."""

    pid: int | None = None
    address: str | None = None


class DataDirBusyError(NekoError):
    """Another kernel (of this process or another) holds the data directory."""

    code = "data_dir_busy"

    def __init__(self, data_dir: Path, holder: LockHolder) -> None:
        who = f"PID {holder.pid}" if holder.pid is not None else "another process"
        super().__init__(f"data directory {str(data_dir)!r} is in use by a running kernel ({who})")
        self.data_dir = data_dir
        self.holder = holder


class DataDirLock:
    """An exclusive lock on one data directory (its methods block: call them from a
    worker thread)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise DataDirBusyError naming its holder."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(_read(fd))
            os.close(fd)
            raise DataDirBusyError(self.data_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write(LockHolder(os.getpid()))

    def check(self) -> None:
        """Raise DataDirBusyError if a kernel holds the directory now (taking nothing)."""
        if self._fd is not None or not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirBusyError(self.data_dir, _parse(_read(fd))) from None
        finally:
            os.close(fd)

    def announce(self, address: str) -> None:
        """Record the address the holder serves its API on."""
        if self._fd is not None:
            self._write(LockHolder(os.getpid(), address))

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # nobody holds it: the next reader must not name us
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def _write(self, holder: LockHolder) -> None:
        assert self._fd is not None
        data = json.dumps({"pid": holder.pid, "address": holder.address}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)


def _read(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 4096, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _parse(data: bytes) -> LockHolder:
    """The holder a lock file names; a file being written (or garbage) names nobody."""
    try:
        raw = json.loads(data)
    except ValueError:
        return LockHolder()
    if not isinstance(raw, dict):
        return LockHolder()
    pid, address = raw.get("pid"), raw.get("address")
    return LockHolder(
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        address if isinstance(address, str) else None,
    )
