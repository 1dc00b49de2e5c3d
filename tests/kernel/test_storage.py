"""Tests of kernel.storage: the embedded SQLite storage of the kernel and plugins."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel.storage import (
    KERNEL_MIGRATIONS,
    PluginStore,
    Storage,
    StorageError,
    split_sql_script,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "nested" / "neko.sqlite3"


@pytest.fixture
async def storage(db_path: Path) -> AsyncIterator[Storage]:
    async with Storage(db_path) as st:
        yield st


def _tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    finally:
        conn.close()
    return {name for (name,) in rows}


# ------------------------------------------------------------------ lifecycle / pragmas


@pytest.mark.anyio
async def test_open_creates_parent_dir_and_sets_pragmas(db_path: Path) -> None:
    assert not await anyio.Path(db_path.parent).exists()
    async with Storage(db_path) as st:
        assert await anyio.Path(db_path).exists()
        assert st.is_open
        assert await st.fetchone("PRAGMA journal_mode") == ("wal",)
        assert await st.fetchone("PRAGMA foreign_keys") == (1,)
        assert await st.fetchone("PRAGMA synchronous") == (1,)  # NORMAL
        busy = await st.fetchone("PRAGMA busy_timeout")
        assert busy is not None and busy[0] > 0
        assert st.schema_version == len(KERNEL_MIGRATIONS)
    assert not st.is_open


@pytest.mark.anyio
async def test_foreign_keys_enforced(storage: Storage) -> None:
    await storage.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    await storage.execute(
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent(id))"
    )
    with pytest.raises(sqlite3.IntegrityError):
        await storage.execute("INSERT INTO child (parent) VALUES (42)")


@pytest.mark.anyio
async def test_close_is_idempotent_and_closed_storage_refuses_work(db_path: Path) -> None:
    st = Storage(db_path)
    await st.close()  # never opened
    await st.open()
    with pytest.raises(StorageError, match="already open"):
        await st.open()
    await st.close()
    await st.close()
    with pytest.raises(StorageError, match="storage is closed"):
        await st.execute("SELECT 1")
    with pytest.raises(StorageError, match="storage is closed"):
        await st.state_get("s", "k")
    with pytest.raises(StorageError, match="storage is closed"):
        await st.plugin_store("foo").kv_get("k")


@pytest.mark.anyio
async def test_kernel_tables_created(db_path: Path) -> None:
    async with Storage(db_path):
        pass
    assert {"kernel_state", "plugin_kv", "plugin_schema"} <= _tables(db_path)


# ------------------------------------------------------------------ migrations


@pytest.mark.anyio
async def test_migrations_idempotent_across_reopen(db_path: Path) -> None:
    async with Storage(db_path) as st:
        await st.state_set("sec", "k", 1)
        first = st.schema_version
    async with Storage(db_path) as st:
        assert st.schema_version == first == len(KERNEL_MIGRATIONS)
        assert await st.state_get("sec", "k") == 1
        assert await st.fetchone("PRAGMA user_version") == (first,)


@pytest.mark.anyio
async def test_newer_schema_version_refused(db_path: Path) -> None:
    async with Storage(db_path):
        pass
    newer = len(KERNEL_MIGRATIONS) + 1
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()

    st = Storage(db_path)
    with pytest.raises(StorageError, match=f"version {newer}.*newer"):
        await st.open()
    assert not st.is_open
    await st.close()


def test_split_sql_script_keeps_triggers_and_strings_whole() -> None:
    script = """
        CREATE TABLE a (x TEXT DEFAULT 'a;b');
        CREATE TRIGGER t AFTER INSERT ON a BEGIN
            UPDATE a SET x = 'c;d';
        END;
        -- trailing comment
    """
    statements = split_sql_script(script)
    assert len(statements) == 2
    assert "'a;b'" in statements[0]
    assert statements[1].strip().startswith("CREATE TRIGGER")
    assert statements[1].rstrip().endswith("END;")


# ------------------------------------------------------------------ transactions / threads


@pytest.mark.anyio
async def test_run_rolls_back_on_exception(storage: Storage) -> None:
    await storage.execute("CREATE TABLE t (x INTEGER)")

    def insert_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await storage.run(insert_then_fail)
    assert await storage.fetchall("SELECT x FROM t") == []

    def insert(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t VALUES (3)")
        return conn.execute("SELECT count(*) FROM t").fetchone()[0]  # type: ignore[no-any-return]

    assert await storage.run(insert) == 1
    assert await storage.fetchall("SELECT x FROM t") == [(3,)]


@pytest.mark.anyio
async def test_run_is_one_transaction(storage: Storage) -> None:
    def in_tx(conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    assert await storage.run(in_tx) is True


@pytest.mark.anyio
async def test_execute_helpers(storage: Storage) -> None:
    await storage.execute("CREATE TABLE t (x INTEGER, y TEXT)")
    assert await storage.executemany("INSERT INTO t VALUES (?, ?)", [(1, "a"), (2, "b")]) == 2
    assert await storage.execute("UPDATE t SET y = :y WHERE x = :x", {"x": 2, "y": "B"}) == 1
    assert await storage.fetchall("SELECT x, y FROM t ORDER BY x") == [(1, "a"), (2, "B")]
    assert await storage.fetchone("SELECT y FROM t WHERE x = ?", (1,)) == ("a",)
    assert await storage.fetchone("SELECT y FROM t WHERE x = ?", (9,)) is None


@pytest.mark.anyio
async def test_sqlite_work_runs_off_the_event_loop_thread(storage: Storage) -> None:
    loop_thread = threading.get_ident()

    def where(conn: sqlite3.Connection) -> int:
        return threading.get_ident()

    assert await storage.run(where) != loop_thread


@pytest.mark.anyio
async def test_concurrent_calls_are_serialized(storage: Storage) -> None:
    await storage.execute("CREATE TABLE c (n INTEGER)")
    await storage.execute("INSERT INTO c VALUES (0)")
    active = 0
    overlap = False

    def bump(conn: sqlite3.Connection) -> None:
        nonlocal active, overlap
        active += 1
        overlap = overlap or active > 1
        n = conn.execute("SELECT n FROM c").fetchone()[0]
        conn.execute("UPDATE c SET n = ?", (n + 1,))
        active -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(storage.run, bump)
    assert not overlap
    assert await storage.fetchone("SELECT n FROM c") == (20,)


# ------------------------------------------------------------------ kernel state


@pytest.mark.anyio
async def test_state_api(storage: Storage) -> None:
    assert await storage.state_get("plugins", "foo") is None
    assert await storage.state_get("plugins", "foo", {"enabled": False}) == {"enabled": False}
    await storage.state_set("plugins", "foo", {"enabled": True, "order": [1, 2]})
    await storage.state_set("plugins", "bar", "x")
    await storage.state_set("other", "foo", 3)
    assert await storage.state_get("plugins", "foo") == {"enabled": True, "order": [1, 2]}
    await storage.state_set("plugins", "foo", None)  # JSON null is a value, not "missing"
    assert await storage.state_get("plugins", "foo", "dflt") is None
    assert await storage.state_items("plugins") == {"bar": "x", "foo": None}

    assert await storage.state_delete("plugins", "foo") is True
    assert await storage.state_delete("plugins", "foo") is False
    assert await storage.state_items("plugins") == {"bar": "x"}
    assert await storage.state_items("other") == {"foo": 3}
    assert await storage.state_items("empty") == {}


@pytest.mark.anyio
async def test_state_set_many_merge_and_replace(storage: Storage) -> None:
    await storage.state_set_many("cfg", {"a": 1, "b": 2})
    await storage.state_set_many("cfg", {"b": 20, "c": 30})
    await storage.state_set("keep", "a", True)
    assert await storage.state_items("cfg") == {"a": 1, "b": 20, "c": 30}

    await storage.state_set_many("cfg", {"c": 300, "d": 400}, replace=True)
    assert await storage.state_items("cfg") == {"c": 300, "d": 400}
    assert await storage.state_items("keep") == {"a": True}

    await storage.state_set_many("cfg", {}, replace=True)
    assert await storage.state_items("cfg") == {}


@pytest.mark.anyio
async def test_state_set_many_is_atomic(storage: Storage) -> None:
    await storage.state_set_many("cfg", {"a": 1})
    with pytest.raises(StorageError, match="'bad'"):
        await storage.state_set_many("cfg", {"b": 2, "bad": object()}, replace=True)
    assert await storage.state_items("cfg") == {"a": 1}
    # That one fails before writing; this one fails in SQLite, after the delete and an insert.
    await storage.execute(
        "CREATE TRIGGER no_bad BEFORE INSERT ON kernel_state WHEN NEW.key = 'bad' "
        "BEGIN SELECT RAISE(ABORT, 'no bad keys'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="no bad keys"):
        await storage.state_set_many("cfg", {"b": 2, "bad": 3}, replace=True)
    assert await storage.state_items("cfg") == {"a": 1}


@pytest.mark.anyio
async def test_state_rejects_bad_input(storage: Storage) -> None:
    with pytest.raises(StorageError, match="'k'"):
        await storage.state_set("s", "k", {1, 2})
    with pytest.raises(StorageError, match="section ''"):
        await storage.state_get("", "k")
    with pytest.raises(StorageError, match="key ''"):
        await storage.state_set("s", "", 1)


# ------------------------------------------------------------------ plugin kv


@pytest.mark.anyio
async def test_plugin_kv_round_trip(storage: Storage) -> None:
    foo = storage.plugin_store("foo")
    other = storage.plugin_store("foo_bar")
    assert isinstance(foo, PluginStore)
    assert foo.plugin == "foo"

    assert await foo.kv_get("missing") is None
    assert await foo.kv_get("missing", 7) == 7
    value: dict[str, Any] = {"n": 1, "f": 1.5, "s": "héllo", "l": [True, None], "d": {}}
    await foo.kv_set("cfg", value)
    await foo.kv_set("count", 1)
    await foo.kv_set("count", 2)
    await other.kv_set("cfg", "other")

    assert await foo.kv_get("cfg") == value
    assert await foo.kv_keys() == ["cfg", "count"]
    assert await foo.kv_items() == {"cfg": value, "count": 2}
    assert await other.kv_items() == {"cfg": "other"}

    assert await foo.kv_delete("count") is True
    assert await foo.kv_delete("count") is False
    assert await foo.kv_keys() == ["cfg"]


@pytest.mark.anyio
async def test_plugin_kv_rejects_non_json(storage: Storage) -> None:
    foo = storage.plugin_store("foo")
    with pytest.raises(StorageError, match="'when'"):
        await foo.kv_set("when", object())
    with pytest.raises(StorageError, match="'nan'"):
        await foo.kv_set("nan", float("nan"))
    assert await foo.kv_keys() == []


# ------------------------------------------------------------------ plugin tables


MIGRATIONS_V1 = (
    """
    CREATE TABLE {t:notes} (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
    CREATE INDEX {t:notes}_body ON {t:notes} (body);
    """,
)
MIGRATIONS_V2 = (
    *MIGRATIONS_V1,
    """
    CREATE TABLE {t:tags} (
        note INTEGER NOT NULL REFERENCES {t:notes}(id) ON DELETE CASCADE,
        tag  TEXT NOT NULL
    );
    CREATE TRIGGER {t:notes}_upper AFTER INSERT ON {t:notes} BEGIN
        UPDATE {t:notes} SET body = upper(NEW.body) WHERE id = NEW.id;
    END;
    """,
)


@pytest.mark.anyio
async def test_table_names_and_placeholders(storage: Storage) -> None:
    foo = storage.plugin_store("foo")
    assert foo.table("notes") == "p_foo__notes"
    assert foo.expand("SELECT * FROM {t:notes} JOIN {t:tags}") == (
        "SELECT * FROM p_foo__notes JOIN p_foo__tags"
    )
    assert foo.expand("SELECT '{x}', '{0}'") == "SELECT '{x}', '{0}'"  # not str.format
    with pytest.raises(StorageError, match="'Bad'"):
        foo.expand("SELECT * FROM {t:Bad}")
    with pytest.raises(StorageError, match="''"):
        foo.expand("SELECT * FROM {t:}")


@pytest.mark.anyio
async def test_plugin_migrate_and_versions_across_reopen(db_path: Path) -> None:
    async with Storage(db_path) as st:
        foo = st.plugin_store("foo")
        assert await foo.schema_version() == 0
        assert await foo.migrate(MIGRATIONS_V1) == 1
        assert await foo.migrate(MIGRATIONS_V1) == 1  # idempotent
        await foo.execute("INSERT INTO {t:notes} (body) VALUES (?)", ("a",))
    assert "p_foo__notes" in _tables(db_path)

    async with Storage(db_path) as st:
        foo = st.plugin_store("foo")
        assert await foo.schema_version() == 1
        assert await foo.migrate(MIGRATIONS_V2) == 2
        assert await foo.fetchone("SELECT version FROM plugin_schema WHERE plugin = 'foo'") == (2,)
        assert (
            await foo.executemany("INSERT INTO {t:notes} (body) VALUES (?)", [("b",), ("c",)]) == 2
        )
        assert await foo.fetchall("SELECT body FROM {t:notes} ORDER BY id") == [
            ("a",),
            ("B",),
            ("C",),
        ]
        await foo.execute("INSERT INTO {t:tags} VALUES (1, 'x')")
        with pytest.raises(sqlite3.IntegrityError):
            await foo.execute("INSERT INTO {t:tags} VALUES (99, 'x')")

    async with Storage(db_path) as st:
        foo = st.plugin_store("foo")
        assert await foo.migrate(MIGRATIONS_V2) == 2
        with pytest.raises(StorageError, match="newer"):
            await foo.migrate(MIGRATIONS_V1)


@pytest.mark.anyio
async def test_failed_plugin_migration_rolls_back_with_its_version(storage: Storage) -> None:
    foo = storage.plugin_store("foo")
    broken = (
        *MIGRATIONS_V1,
        "CREATE TABLE {t:half} (x INTEGER); INSERT INTO {t:nonexistent} VALUES (1);",
    )
    with pytest.raises(sqlite3.OperationalError):
        await foo.migrate(broken)
    assert await foo.schema_version() == 1  # v1 committed, v2 rolled back
    assert await storage.fetchall("SELECT name FROM sqlite_master WHERE name = 'p_foo__half'") == []


@pytest.mark.anyio
async def test_drop_plugin_data_respects_name_prefixes(db_path: Path) -> None:
    async with Storage(db_path) as st:
        foo = st.plugin_store("foo")
        foo_bar = st.plugin_store("foo_bar")
        for store in (foo, foo_bar):
            await store.migrate(MIGRATIONS_V2)
            await store.kv_set("k", store.plugin)
            await store.execute("INSERT INTO {t:notes} (body) VALUES ('n')")
            await store.execute("INSERT INTO {t:tags} VALUES (1, 't')")
        await foo.execute("CREATE VIEW {t:v} AS SELECT * FROM {t:notes}")
        await st.execute("CREATE TABLE p_foox__t (x INTEGER)")

        await st.drop_plugin_data("foo")

        assert await foo.kv_items() == {}
        assert await foo.schema_version() == 0
        assert await foo_bar.kv_items() == {"k": "foo_bar"}
        assert await foo_bar.schema_version() == 2
        assert await foo_bar.fetchall("SELECT body FROM {t:notes}") == [("N",)]
        names = {name for (name,) in await st.fetchall("SELECT name FROM sqlite_master")}
        assert not {n for n in names if n.startswith("p_foo__")}
        assert {"p_foo_bar__notes", "p_foo_bar__tags", "p_foox__t"} <= names

        # The plugin can start again from scratch.
        assert await foo.migrate(MIGRATIONS_V1) == 1
        assert await foo.fetchall("SELECT * FROM {t:notes}") == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "name",
    ["", "Foo", "1foo", "_foo", "foo-bar", "foo bar", "foo__bar", "foo_", "a" * 65, "föö"],
)
async def test_invalid_plugin_names_rejected(storage: Storage, name: str) -> None:
    with pytest.raises(StorageError, match="invalid plugin name"):
        storage.plugin_store(name)
    with pytest.raises(StorageError, match="invalid plugin name"):
        await storage.drop_plugin_data(name)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["", "Notes", "9x", "_x", "x-y", "x;drop", "a" * 65])
async def test_invalid_table_names_rejected(storage: Storage, name: str) -> None:
    with pytest.raises(StorageError, match="invalid table name"):
        storage.plugin_store("foo").table(name)


@pytest.mark.anyio
async def test_valid_names_accepted(storage: Storage) -> None:
    assert storage.plugin_store("a").table("b") == "p_a__b"
    long = "a" * 64
    assert storage.plugin_store(long).table(long) == f"p_{long}__{long}"
    assert storage.plugin_store("my_plugin2").table("t_1") == "p_my_plugin2__t_1"
