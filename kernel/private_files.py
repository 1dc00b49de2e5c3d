"""Files and directories that only the bot's user may read.

The data directory holds the password hashes (in `nekobot.db` and its `-wal`), the JWT
signing secret, plugin secrets and logs. Modes are set explicitly, not left to the umask:
a umask only ever removes bits, and the usual 022 leaves everything world-readable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Mode of the directories the kernel creates under (and as) the data directory.
DIR_MODE = 0o700
#: Mode of every file the kernel writes under the data directory.
FILE_MODE = 0o600
#: The files SQLite keeps next to a database in WAL mode.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def make_data_dir(path: Path) -> str | None:
    """Create the data directory `path` (mode 0700) if it is missing; an existing one
    keeps its mode, as its owner chose it. Returns a warning to log when other users may
    enter an existing one (the files in it are 0600 all the same)."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            return (
                f"the data directory {str(path)!r} is open to other users (mode {mode:04o}); "
                f"`chmod 700 {path}` keeps them from listing it"
            )
        return None
    os.chmod(path, DIR_MODE)  # the umask may have taken bits from the owner too
    return None


def make_private_dir(path: Path) -> Path:
    """Create `path` (its missing parents too) with mode 0700, or tighten it to 0700: for
    directories the kernel owns under the data directory (`logs/`, `plugin_data/...`)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def make_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it is missing, or tighten it to 0600 (files
    written by an earlier version, or under another umask, may be wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.chmod(path, FILE_MODE)
    finally:
        os.close(fd)


def tighten(path: Path) -> None:
    """Make an existing file 0600; a missing one is fine."""
    try:
        if stat.S_IMODE(path.stat().st_mode) != FILE_MODE:
            os.chmod(path, FILE_MODE)
    except FileNotFoundError:
        pass


def private_database(path: Path) -> None:
    """Prepare a SQLite database file to be opened: it and the files SQLite keeps beside
    it are 0600. SQLite creates its `-wal` and `-shm` with the mode of the database file,
    so a 0600 database gets private side files; ones left from before are tightened."""
    make_private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        tighten(path.with_name(path.name + suffix))
