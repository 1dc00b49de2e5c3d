"""Embedded SQLite storage of the kernel and of plugins.

One :class:`Storage` owns one SQLite connection. Every piece of SQLite work runs in a
worker thread through a capacity limiter of size one that belongs to the instance, so
calls never block the event loop and are serialized on the single connection.

Plugins get a namespace through :meth:`Storage.plugin_store`: a JSON key/value area
and their own tables, named ``p_<plugin>__<name>``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread

from kernel.errors import NekoError
from kernel.portable_sql import check_portable
from kernel.private_files import private_database

__all__ = [
    "KERNEL_MIGRATIONS",
    "Params",
    "PluginStore",
    "Storage",
    "StorageError",
]

T = TypeVar("T")

Params = Sequence[Any] | Mapping[str, Any]
"""Parameters of one SQL statement: positional (``?``) or named (``:name``)."""

_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PLACEHOLDER_RE = re.compile(r"\{t:([^{}]*)\}")

KERNEL_MIGRATIONS: tuple[str, ...] = (
    # v1
    """
    CREATE TABLE kernel_state (
        section TEXT NOT NULL,
        key     TEXT NOT NULL,
        value   TEXT NOT NULL, -- JSON
        PRIMARY KEY (section, key)
    );
    CREATE TABLE plugin_kv (
        plugin TEXT NOT NULL,
        key    TEXT NOT NULL,
        value  TEXT NOT NULL, -- JSON
        PRIMARY KEY (plugin, key)
    );
    CREATE TABLE plugin_schema (
        plugin  TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    """,
)
"""Kernel schema migrations; the script at index ``i`` brings the schema to version ``i + 1``."""


class StorageError(NekoError):
    """Storage misuse: a closed storage, an invalid name, a value that is not JSON."""


# --------------------------------------------------------------------------- helpers


def validate_plugin_name(plugin: str) -> str:
    """Return ``plugin`` if it is a valid plugin namespace, else raise :class:`StorageError`.

    Besides ``^[a-z][a-z0-9_]{0,63}$`` a plugin name may neither contain ``__`` nor end
    with ``_``: table names are ``p_<plugin>__<name>``, and those two rules make the
    plugin part of a table name unambiguous (``foo`` can never claim ``foo_``'s tables).
    """
    if (
        not isinstance(plugin, str)
        or _NAME_RE.fullmatch(plugin) is None
        or "__" in plugin
        or plugin.endswith("_")
    ):
        raise StorageError(
            f"invalid plugin name {plugin!r}: expected lowercase letters, digits and single "
            "underscores, starting with a letter, not ending with '_', at most 64 characters"
        )
    return plugin


def _validate_table_name(name: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise StorageError(f"invalid table name {name!r}: expected ^[a-z][a-z0-9_]{{0,63}}$")
    return name


def _validate_text(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise StorageError(f"invalid {kind} {value!r}: expected a non-empty string")
    return value


def _dump_json(kind: str, key: str, value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StorageError(f"value of {kind} {key!r} is not JSON-serializable: {exc}") from exc


def split_sql_script(script: str) -> list[str]:
    """Split an SQL script into complete statements (semicolons in strings and triggers are safe).

    ``sqlite3.Connection.executescript`` commits any open transaction first, so scripts are
    split and run statement by statement to stay inside one transaction.
    """
    statements: list[str] = []
    buf = ""
    for part in script.split(";"):
        buf += part + ";"
        if sqlite3.complete_statement(buf):
            if _has_code(buf):
                statements.append(buf)
            buf = ""
    if _has_code(buf):
        statements.append(buf)  # incomplete: let SQLite report the syntax error
    return statements


def _has_code(chunk: str) -> bool:
    """Whether ``chunk`` holds anything but whitespace, semicolons and comments."""
    i, n = 0, len(chunk)
    while i < n:
        if chunk.startswith("--", i):
            end = chunk.find("\n", i)
            i = n if end < 0 else end + 1
        elif chunk.startswith("/*", i):
            end = chunk.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif chunk[i].isspace() or chunk[i] == ";":
            i += 1
        else:
            return True
    return False


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in split_sql_script(script):
        conn.execute(statement)


# --------------------------------------------------------------------------- storage


class Storage:
    """An embedded SQLite database in one file, used from async code.

    Open it with :meth:`open` (or ``async with Storage(path) as st:``); opening applies the
    kernel migrations in :data:`KERNEL_MIGRATIONS`.
    """

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self._path = Path(path)
        self._busy_timeout_ms = max(0, int(busy_timeout * 1000))
        self._limiter = anyio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._schema_version = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def is_open(self) -> bool:
        """Whether the storage is open."""
        return self._conn is not None

    @property
    def schema_version(self) -> int:
        """The kernel schema version of the database (last known value when closed)."""
        return self._schema_version

    async def open(self) -> None:
        """Connect, configure the connection and apply missing kernel migrations."""
        if self._conn is not None:
            raise StorageError(f"storage {str(self._path)!r} is already open")
        await anyio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 before SQLite opens it: its -wal and -shm (the WAL holds recent writes,
        # password hashes included) take the database file's mode.
        private_database(self._path)
        conn = sqlite3.connect(
            self._path,
            check_same_thread=False,
            isolation_level=None,
            timeout=self._busy_timeout_ms / 1000,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._schema_version = self._migrate_sync(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate_sync(self, conn: sqlite3.Connection) -> int:
        latest = len(KERNEL_MIGRATIONS)
        version = self._check_version(int(conn.execute("PRAGMA user_version").fetchone()[0]))
        while version < latest:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-read under the write lock: another process may have migrated meanwhile.
                current = self._check_version(
                    int(conn.execute("PRAGMA user_version").fetchone()[0])
                )
                if current == version:
                    _execute_script(conn, KERNEL_MIGRATIONS[version])
                    current = version + 1
                    conn.execute(f"PRAGMA user_version = {current:d}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            version = current
        return version

    def _check_version(self, version: int) -> int:
        latest = len(KERNEL_MIGRATIONS)
        if version > latest:
            raise StorageError(
                f"database {str(self._path)!r} has kernel schema version {version}, newer than "
                f"version {latest} known to this code; upgrade NekoBot or use another file"
            )
        return version

    async def close(self) -> None:
        """Close the connection; closing a closed storage does nothing."""
        if self._conn is None:
            return
        await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- core

    def _require_open(self) -> None:
        if self._conn is None:
            raise StorageError("storage is closed")

    async def _transaction(self, fn: Callable[[sqlite3.Connection], T], begin: str) -> T:
        self._require_open()

        def work() -> T:
            conn = self._conn
            if conn is None:  # closed while this call waited for the limiter
                raise StorageError("storage is closed")
            conn.execute(begin)
            try:
                result = fn(conn)
                if conn.in_transaction:
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the worker thread inside one write transaction.

        The transaction (``BEGIN IMMEDIATE``) is committed when ``fn`` returns and rolled
        back when it raises; the exception propagates.
        """
        return await self._transaction(fn, "BEGIN IMMEDIATE")

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._transaction(fn, "BEGIN")

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Execute one statement in its own transaction; return the row count."""
        return await self.run(lambda conn: conn.execute(sql, params).rowcount)

    async def executemany(self, sql: str, seq_of_params: Iterable[Params]) -> int:
        """Execute one statement for each parameter set, all in one transaction."""
        rows = list(seq_of_params)
        return await self.run(lambda conn: conn.executemany(sql, rows).rowcount)

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Return all rows of a query."""
        return await self._read(
            lambda conn: [tuple(row) for row in conn.execute(sql, params).fetchall()]
        )

    async def fetchone(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        """Return the first row of a query, or ``None``."""

        def fetch(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else tuple(row)

        return await self._read(fetch)

    # ---------------------------------------------------------------- kernel state

    async def state_get(self, section: str, key: str, default: Any = None) -> Any:
        """Return the JSON value stored under ``(section, key)``, or ``default``."""
        _validate_text("section", section)
        _validate_text("key", key)
        row = await self.fetchone(
            "SELECT value FROM kernel_state WHERE section = ? AND key = ?", (section, key)
        )
        return default if row is None else json.loads(row[0])

    async def state_set(self, section: str, key: str, value: Any) -> None:
        """Store a JSON-serializable ``value`` under ``(section, key)``."""
        _validate_text("section", section)
        _validate_text("key", key)
        text = _dump_json("state key", key, value)
        await self.execute(
            "INSERT INTO kernel_state (section, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (section, key) DO UPDATE SET value = excluded.value",
            (section, key, text),
        )

    async def state_delete(self, section: str, key: str) -> bool:
        """Delete ``(section, key)``; return whether it existed."""
        _validate_text("section", section)
        _validate_text("key", key)
        count = await self.execute(
            "DELETE FROM kernel_state WHERE section = ? AND key = ?", (section, key)
        )
        return count > 0

    async def state_items(self, section: str) -> dict[str, Any]:
        """Return every key of ``section`` with its decoded value, ordered by key."""
        _validate_text("section", section)
        rows = await self.fetchall(
            "SELECT key, value FROM kernel_state WHERE section = ? ORDER BY key", (section,)
        )
        return {key: json.loads(value) for key, value in rows}

    async def state_set_many(
        self, section: str, mapping: Mapping[str, Any], *, replace: bool = False
    ) -> None:
        """Store several keys of ``section`` in one transaction.

        With ``replace=True`` the section's keys absent from ``mapping`` are deleted too.
        """
        _validate_text("section", section)
        rows = [
            (section, _validate_text("key", key), _dump_json("state key", key, value))
            for key, value in mapping.items()
        ]

        def write(conn: sqlite3.Connection) -> None:
            if replace:
                conn.execute("DELETE FROM kernel_state WHERE section = ?", (section,))
            conn.executemany(
                "INSERT INTO kernel_state (section, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (section, key) DO UPDATE SET value = excluded.value",
                rows,
            )

        await self.run(write)

    # ---------------------------------------------------------------- plugins

    def plugin_store(self, plugin: str, check: Callable[[], None] | None = None) -> PluginStore:
        """Return the storage namespace of ``plugin`` (the name is validated); ``check``
        runs before each of its operations (and raises to refuse it)."""
        return PluginStore(self, plugin, check)

    async def drop_plugin_data(self, plugin: str) -> None:
        """Delete everything ``plugin`` stored: kv rows, schema version, tables and views."""
        validate_plugin_name(plugin)
        prefix = f"p_{plugin}__"

        def drop(conn: sqlite3.Connection) -> None:
            # Child tables may reference parent tables of the same plugin: check foreign
            # keys at commit time, when all of them are gone.
            conn.execute("PRAGMA defer_foreign_keys = ON")
            objects = conn.execute(
                "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view')"
            ).fetchall()
            # Filter in Python: '_' is a LIKE wildcard.
            owned = [
                (kind, name)
                for kind, name in objects
                if name.startswith(prefix) and _NAME_RE.fullmatch(name[len(prefix) :])
            ]
            for kind, name in sorted(owned, key=lambda item: item[0] != "view"):
                conn.execute(f'DROP {"VIEW" if kind == "view" else "TABLE"} IF EXISTS "{name}"')
            conn.execute("DELETE FROM plugin_kv WHERE plugin = ?", (plugin,))
            conn.execute("DELETE FROM plugin_schema WHERE plugin = ?", (plugin,))

        await self.run(drop)


class PluginStore:
    """The storage namespace of one plugin: JSON key/value pairs and ``p_<plugin>__*`` tables."""

    def __init__(
        self, storage: Storage, plugin: str, check: Callable[[], None] | None = None
    ) -> None:
        self._storage_ = storage
        self._plugin = validate_plugin_name(plugin)
        self._check = check

    @property
    def _storage(self) -> Storage:
        # A store kept by a plugin's code outlives nothing: once the plugin is disposed,
        # `check` refuses (the same check as `ctx.store`).
        if self._check is not None:
            self._check()
        return self._storage_

    @property
    def plugin(self) -> str:
        """The plugin name."""
        return self._plugin

    # ---------------------------------------------------------------- kv

    async def kv_get(self, key: str, default: Any = None) -> Any:
        """Return the JSON value stored under ``key``, or ``default``."""
        _validate_text("key", key)
        row = await self._storage.fetchone(
            "SELECT value FROM plugin_kv WHERE plugin = ? AND key = ?", (self._plugin, key)
        )
        return default if row is None else json.loads(row[0])

    async def kv_set(self, key: str, value: Any) -> None:
        """Store a JSON-serializable ``value`` under ``key``."""
        _validate_text("key", key)
        text = _dump_json("key", key, value)
        await self._storage.execute(
            "INSERT INTO plugin_kv (plugin, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
            (self._plugin, key, text),
        )

    async def kv_delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        _validate_text("key", key)
        count = await self._storage.execute(
            "DELETE FROM plugin_kv WHERE plugin = ? AND key = ?", (self._plugin, key)
        )
        return count > 0

    async def kv_keys(self) -> list[str]:
        """Return the plugin's keys, sorted."""
        rows = await self._storage.fetchall(
            "SELECT key FROM plugin_kv WHERE plugin = ? ORDER BY key", (self._plugin,)
        )
        return [key for (key,) in rows]

    async def kv_items(self) -> dict[str, Any]:
        """Return every key with its decoded value, ordered by key."""
        rows = await self._storage.fetchall(
            "SELECT key, value FROM plugin_kv WHERE plugin = ? ORDER BY key", (self._plugin,)
        )
        return {key: json.loads(value) for key, value in rows}

    # ---------------------------------------------------------------- tables

    def table(self, name: str) -> str:
        """Return the real name ``p_<plugin>__<name>`` of the plugin's table ``name``."""
        return f"p_{self._plugin}__{_validate_table_name(name)}"

    def expand(self, sql: str) -> str:
        """Replace every ``{t:NAME}`` placeholder in ``sql`` by :meth:`table` of ``NAME``.

        Refuses (NonPortableSQLError) SQL that only SQLite runs: a plugin's SQL must run
        on every storage backend (docs/storage.md).
        """
        check_portable(sql)
        return _PLACEHOLDER_RE.sub(lambda match: self.table(match.group(1)), sql)

    async def schema_version(self) -> int:
        """Return the plugin's schema version (0 before any migration)."""
        row = await self._storage.fetchone(
            "SELECT version FROM plugin_schema WHERE plugin = ?", (self._plugin,)
        )
        return 0 if row is None else int(row[0])

    async def migrate(self, scripts: Sequence[str]) -> int:
        """Apply the missing scripts (script ``i`` brings the schema to version ``i + 1``).

        Each script runs in its own transaction together with its version bump; scripts
        may use ``{t:NAME}`` placeholders. Returns the resulting version.
        """
        expanded = [self.expand(script) for script in scripts]
        latest = len(expanded)
        plugin = self._plugin

        def current_version(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT version FROM plugin_schema WHERE plugin = ?", (plugin,)
            ).fetchone()
            version = 0 if row is None else int(row[0])
            if version > latest:
                raise StorageError(
                    f"plugin {plugin!r} has schema version {version} in the database, newer "
                    f"than the {latest} migration(s) it provides"
                )
            return version

        def apply_next(conn: sqlite3.Connection) -> int:
            version = current_version(conn)
            if version < latest:
                _execute_script(conn, expanded[version])
                version += 1
                conn.execute(
                    "INSERT INTO plugin_schema (plugin, version) VALUES (?, ?) "
                    "ON CONFLICT (plugin) DO UPDATE SET version = excluded.version",
                    (plugin, version),
                )
            return version

        version = await self._storage._read(current_version)
        while version < latest:
            version = await self._storage.run(apply_next)
        return version

    async def execute(self, sql: str, params: Params = ()) -> int:
        """:meth:`Storage.execute` with ``{t:NAME}`` placeholders expanded."""
        return await self._storage.execute(self.expand(sql), params)

    async def executemany(self, sql: str, seq_of_params: Iterable[Params]) -> int:
        """:meth:`Storage.executemany` with ``{t:NAME}`` placeholders expanded."""
        return await self._storage.executemany(self.expand(sql), seq_of_params)

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """:meth:`Storage.fetchall` with ``{t:NAME}`` placeholders expanded."""
        return await self._storage.fetchall(self.expand(sql), params)

    async def fetchone(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        """:meth:`Storage.fetchone` with ``{t:NAME}`` placeholders expanded."""
        return await self._storage.fetchone(self.expand(sql), params)
