"""The portable SQL that plugins write against their store.

The embedded backend is SQLite; a PostgreSQL backend will follow. A plugin's SQL must
run on both, so `PluginStore` refuses, on SQLite already, the SQLite-only constructs
that are easy to write by habit (each refusal names the portable form). What a check
cannot see (type affinity, LIKE's case rules, ...) is written down in docs/storage.md.
"""

from __future__ import annotations

import functools
import re

from kernel.errors import NekoError


class NonPortableSQLError(NekoError):
    """A plugin's SQL uses a construct that only SQLite understands."""


# Literals, quoted identifiers and comments are blanked out before matching, so that a
# word inside a string ('INSERT OR REPLACE' as data) is no false alarm.
_NOISE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.I), advice)
    for pattern, advice in (
        (
            r"\bINSERT\s+OR\s+(REPLACE|IGNORE|ABORT|FAIL|ROLLBACK)\b",
            "INSERT OR ... is SQLite-only; use INSERT ... ON CONFLICT (columns) "
            "DO UPDATE SET col = excluded.col (or DO NOTHING)",
        ),
        (
            r"^\s*REPLACE\s+INTO\b",
            "REPLACE INTO is SQLite-only; use INSERT ... ON CONFLICT (columns) DO UPDATE",
        ),
        (
            r"\bAUTOINCREMENT\b",
            "AUTOINCREMENT is SQLite-only; generate keys in the plugin (e.g. uuid4().hex)",
        ),
        (r"^\s*(PRAGMA|ATTACH|DETACH|VACUUM|REINDEX)\b", "{0} is SQLite-only"),
        (r"\bsqlite_\w+", "{0} is SQLite's own catalogue; plugins keep to their own tables"),
        (r"\bWITHOUT\s+ROWID\b", "WITHOUT ROWID is SQLite-only"),
        (r"\)\s*STRICT\b", "STRICT tables are SQLite-only"),
        (r"\bGLOB\b", "GLOB is SQLite-only; use LIKE"),
        (r"\bIFNULL\s*\(", "IFNULL is not standard SQL; use COALESCE"),
        (r"\bGROUP_CONCAT\s*\(", "GROUP_CONCAT is SQLite-only; aggregate in Python"),
        (
            r"\b(datetime|julianday|strftime|unixepoch)\s*\(",
            "{0}() is SQLite-only; pass times as parameters (epoch seconds or ISO 8601 text)",
        ),
        (r"\bLIMIT\s+[\w?:]+\s*,", "LIMIT offset, count is not portable; use LIMIT n OFFSET m"),
        (r"`|\[\w+\]", "quote identifiers with double quotes, not backticks or brackets"),
    )
)


@functools.lru_cache(maxsize=1024)  # plugins run the same few statements over and over
def check_portable(sql: str) -> str:
    """Return `sql` if it avoids the SQLite-only constructs; else raise
    NonPortableSQLError naming the construct and its portable form."""
    text = _NOISE.sub(" ", sql)
    for statement in text.split(";"):
        for pattern, advice in _RULES:
            match = pattern.search(statement)
            if match is not None:
                word = match.group(1) if match.groups() else match.group(0)
                raise NonPortableSQLError(
                    f"not portable SQL: {advice.format(word.strip())} (docs/storage.md)"
                )
    return sql
