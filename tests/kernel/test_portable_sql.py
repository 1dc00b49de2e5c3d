"""Tests of kernel.portable_sql: plugin SQL that only SQLite would run is refused."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kernel.portable_sql import NonPortableSQLError, check_portable
from kernel.storage import Storage

KERNEL = Path(__file__).resolve().parents[2] / "kernel"

PORTABLE = [
    "INSERT INTO {t:x} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
    "INSERT INTO {t:x} (k) VALUES (:k) ON CONFLICT (k) DO NOTHING",
    "SELECT COALESCE(v, 'INSERT OR REPLACE') FROM {t:x} ORDER BY k LIMIT 10 OFFSET 20",
    "CREATE TABLE {t:x} (k TEXT PRIMARY KEY, n BIGINT NOT NULL, at DOUBLE PRECISION)",
    'SELECT "order" FROM {t:x} -- REPLACE INTO in a comment\nWHERE lower(k) LIKE lower(?)',
    "UPDATE {t:x} SET n = n + 1 WHERE k = ? RETURNING n",
]

REFUSED = [
    ("INSERT OR REPLACE INTO {t:x} (k) VALUES (?)", "ON CONFLICT"),
    ("insert or ignore into {t:x} (k) values (?)", "DO NOTHING"),
    ("REPLACE INTO {t:x} (k) VALUES (?)", "ON CONFLICT"),
    ("CREATE TABLE {t:x} (id INTEGER PRIMARY KEY AUTOINCREMENT)", "uuid4"),
    ("PRAGMA table_info({t:x})", "PRAGMA is SQLite-only"),
    ("SELECT name FROM sqlite_master", "sqlite_master"),
    ("CREATE TABLE {t:x} (k TEXT) WITHOUT ROWID", "WITHOUT ROWID"),
    ("CREATE TABLE {t:x} (k TEXT) STRICT", "STRICT"),
    ("SELECT k FROM {t:x} WHERE k GLOB 'a*'", "LIKE"),
    ("SELECT IFNULL(v, 0) FROM {t:x}", "COALESCE"),
    ("SELECT group_concat(k) FROM {t:x}", "GROUP_CONCAT"),
    ("SELECT k FROM {t:x} WHERE at < datetime('now')", "datetime() is SQLite-only"),
    ("SELECT k FROM {t:x} LIMIT 20, 10", "LIMIT n OFFSET m"),
    ("SELECT `k` FROM {t:x}", "double quotes"),
    ("CREATE TABLE {t:a} (k TEXT); INSERT OR REPLACE INTO {t:a} VALUES (1)", "ON CONFLICT"),
]


@pytest.mark.parametrize("sql", PORTABLE)
def test_portable_sql_passes(sql: str) -> None:
    assert check_portable(sql) == sql


@pytest.mark.parametrize(("sql", "advice"), REFUSED)
def test_sqlite_only_sql_is_refused_with_the_portable_form(sql: str, advice: str) -> None:
    with pytest.raises(NonPortableSQLError) as err:
        check_portable(sql)
    assert advice in err.value.message
    assert "docs/storage.md" in err.value.message


@pytest.mark.anyio
async def test_a_plugin_store_refuses_it_before_anything_runs(tmp_path: Path) -> None:
    async with Storage(tmp_path / "db.sqlite3") as st:
        store = st.plugin_store("neko_sql")
        await store.migrate(["CREATE TABLE {t:kv} (k TEXT PRIMARY KEY, v TEXT)"])
        with pytest.raises(NonPortableSQLError):
            await store.execute("INSERT OR REPLACE INTO {t:kv} (k, v) VALUES ('a', 'b')")
        with pytest.raises(NonPortableSQLError):
            await store.migrate(
                [
                    "CREATE TABLE {t:kv} (k TEXT PRIMARY KEY, v TEXT)",
                    "CREATE TABLE {t:log} (id INTEGER PRIMARY KEY AUTOINCREMENT)",
                ]
            )
        assert await store.fetchall("SELECT k FROM {t:kv}") == []
        assert await store.schema_version() == 1
        await store.execute(
            "INSERT INTO {t:kv} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            ("a", "b"),
        )
        assert await store.fetchall("SELECT k, v FROM {t:kv}") == [("a", "b")]


SQL = re.compile(
    r"^\s*(SELECT\b.*\bFROM\b|INSERT INTO\b|UPDATE \S+ SET\b|DELETE FROM\b|"
    r"(CREATE|DROP|ALTER) (TABLE|INDEX|VIEW|TRIGGER)\b|PRAGMA\b)",
    re.S,
)


def test_all_kernel_sql_lives_in_storage() -> None:
    """Only kernel/storage.py talks SQL: a second backend replaces one module."""
    assert SQL.match("SELECT value FROM kernel_state") and not SQL.match("Select a plugin")
    offenders = []
    for path in sorted(KERNEL.rglob("*.py")):
        if path.name in ("storage.py", "portable_sql.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and SQL.match(node.value):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
