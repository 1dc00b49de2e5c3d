"""The data directory and what the kernel writes in it are private to the bot's user."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.testing import running_kernel
from tests.plugin_factory import purge_modules, write_plugin

pytestmark = pytest.mark.anyio

FILES_PLUGIN = """
from kernel import hookimpl

@hookimpl
async def nekobot_plugin_start(ctx):
    (ctx.data_dir / "cache.txt").write_text("x")
    await ctx.store.kv_set("api_key", "sk-live-0123456789")
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """A umask for the test: the modes must not depend on it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


async def test_a_new_data_dir_and_its_files_are_private(tmp_path: Path, umask: int) -> None:
    data = tmp_path / "data"
    plugins = tmp_path / "plugins"
    purge_modules("pf_files")
    write_plugin(plugins, "pf_files", FILES_PLUGIN)
    async with running_kernel(
        data, plugin_dirs=[plugins], builtin_plugins=["api", "auth"]
    ) as kernel:
        kernel.log.warning("a record for the log file")
        db = data / "nekobot.db"
        # Open: the WAL (recent writes, password hashes included) and its index exist.
        for path in (db, db.with_name("nekobot.db-wal"), db.with_name("nekobot.db-shm")):
            assert mode(path) == 0o600, path
        assert mode(data / "jwt_secret") == 0o600
        assert mode(data / "plugin_data") == 0o700
        assert mode(data / "plugin_data" / "pf_files") == 0o700
    assert mode(data) == 0o700
    assert mode(data / "logs") == 0o700
    log_file = data / "logs" / "nekobot.log"
    assert "a record for the log file" in log_file.read_text()
    assert mode(log_file) == 0o600


async def test_files_left_readable_are_tightened_and_an_open_data_dir_is_named(
    tmp_path: Path, umask: int
) -> None:
    # What an earlier version left: everything readable by everyone.
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    os.chmod(data, 0o755)
    os.chmod(data / "logs", 0o755)
    with sqlite3.connect(data / "nekobot.db") as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x)")
    for name in ("nekobot.db", "nekobot.db-wal", "nekobot.db-shm"):
        (data / name).touch()
        os.chmod(data / name, 0o644)
    for name in ("nekobot.log", "nekobot.log.1"):
        (data / "logs" / name).write_text("")
        os.chmod(data / "logs" / name, 0o644)
    (data / "jwt_secret").write_text("a-secret-written-by-hand-of-at-least-32-bytes")
    os.chmod(data / "jwt_secret", 0o644)
    async with running_kernel(data, builtin_plugins=["api", "auth"]) as kernel:
        for name in ("nekobot.db", "nekobot.db-wal", "nekobot.db-shm", "jwt_secret"):
            assert mode(data / name) == 0o600, name
        warnings = [r.message for r in kernel.logging.buffer.records if r.level == "WARNING"]
    for name in ("nekobot.log", "nekobot.log.1"):
        assert mode(data / "logs" / name) == 0o600, name
    assert mode(data / "logs") == 0o700
    # The data directory itself is the owner's choice: kept, but named in a warning.
    assert mode(data) == 0o755
    assert any("chmod 700" in w and "0755" in w for w in warnings), warnings
