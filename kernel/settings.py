"""Runtime settings that admins change while the bot runs (stored, not constructed).

Two objects: `BotConfig` (how the bot behaves in chats) and `Settings` (how the server
behaves). Each has a JSON Schema; a partial update is merged over the current value,
validated as a whole, and only then stored and applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from jsonschema import Draft202012Validator

from kernel.errors import ConfigError
from kernel.plugin_config import describe_error


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)  # type: ignore[attr-defined]


@attrs.frozen
class BotConfig:
    """How the bot behaves in chats."""

    #: Messages starting with one of these are commands (longest prefix wins).
    command_prefixes: tuple[str, ...] = attrs.field(default=("/",), converter=_strings)
    #: Words that address the bot in a group chat.
    wake_words: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    #: Sender ids (`id` or `platform:id`) allowed to run admin commands.
    admin_ids: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    #: When the LLM answers non-command messages: never, when addressed, or always.
    llm_reply_mode: str = "mention"
    #: The LLM provider and personality used when none is named.
    default_provider: str | None = None
    default_personality: str | None = None


@attrs.frozen
class Settings:
    """How the server behaves."""

    #: Watch plugin directories and reload plugins whose files change.
    hot_reload: bool = True
    #: API requests per minute and client.
    rate_limit_per_minute: int = 600
    #: Failed logins per client address or username before login is refused for a while.
    login_max_failures: int = 5
    login_window_seconds: int = 300
    #: Lifetime of an access token.
    token_ttl_seconds: int = 86400
    #: Origins allowed to call the API from a browser (CORS).
    cors_origins: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    #: Level of the `nekobot` loggers.
    log_level: str = "INFO"
    #: Let anonymous guests use the web chat (rate limited, own sessions only).
    guest_webchat: bool = False
    #: Install the Python dependencies that an uploaded plugin's manifest lists.
    allow_pip_install: bool = False
    #: Largest plugin upload, in bytes.
    upload_max_bytes: int = 5 * 1024 * 1024
    #: Largest request body of a route that sets no `body_limit` (every JSON route).
    request_max_bytes: int = 1024 * 1024
    #: Dashboard preferences (free-form, stored as given).
    ui: dict[str, Any] = attrs.field(factory=dict)


_STR_LIST = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 64},
    "maxItems": 50,
}

BOT_CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "command_prefixes": {**_STR_LIST, "minItems": 1, "maxItems": 10},
        "wake_words": _STR_LIST,
        "admin_ids": {**_STR_LIST, "maxItems": 1000},
        "llm_reply_mode": {"enum": ["off", "mention", "always"]},
        "default_provider": {"type": ["string", "null"], "maxLength": 128},
        "default_personality": {"type": ["string", "null"], "maxLength": 128},
    },
}

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "hot_reload": {"type": "boolean"},
        "rate_limit_per_minute": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "login_max_failures": {"type": "integer", "minimum": 1, "maximum": 1000},
        "login_window_seconds": {"type": "integer", "minimum": 1, "maximum": 86400},
        "token_ttl_seconds": {"type": "integer", "minimum": 60, "maximum": 2_592_000},
        "cors_origins": {
            "type": "array",
            "maxItems": 50,
            "items": {"type": "string", "pattern": "^https?://[^/\\s]+$"},
        },
        "log_level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
        "guest_webchat": {"type": "boolean"},
        "allow_pip_install": {"type": "boolean"},
        "upload_max_bytes": {"type": "integer", "minimum": 1024, "maximum": 512 * 1024 * 1024},
        "request_max_bytes": {"type": "integer", "minimum": 1024, "maximum": 512 * 1024 * 1024},
        "ui": {"type": "object"},
    },
}

#: Settings that take effect only after a restart (none today; the API reports them).
RESTART_REQUIRED: frozenset[str] = frozenset()

#: How deep, and how big, a value may be (`ui` is free-form): far beyond any real
#: preference, far below what recursive validation and conversion can handle.
MAX_DEPTH = 32
MAX_ITEMS = 10_000

T = TypeVar("T", BotConfig, Settings)
_converter = cattrs.Converter()


def to_json(value: BotConfig | Settings) -> dict[str, Any]:
    """The JSON-ready form of a settings object."""
    data: dict[str, Any] = _converter.unstructure(value)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _check_shape(field: str, value: Any) -> None:
    """ConfigError naming `field` if `value` nests deeper than MAX_DEPTH or holds more
    than MAX_ITEMS values (walked without recursion: the point is to stop recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while pending:
        item, depth = pending.pop()
        count += 1
        if count > MAX_ITEMS:
            raise ConfigError(field, f"holds more than {MAX_ITEMS} values")
        children = item.values() if isinstance(item, Mapping) else item
        if isinstance(item, Mapping | list | tuple):
            if depth > MAX_DEPTH:
                raise ConfigError(field, f"is nested deeper than {MAX_DEPTH} levels")
            pending.extend((child, depth + 1) for child in children)


def merged(current: T, changes: Any, schema: Mapping[str, Any]) -> T:
    """`current` with `changes` merged in, validated; ConfigError names the bad field."""
    if not isinstance(changes, Mapping):
        raise ConfigError("body", "must be a JSON object")
    for key, value in changes.items():
        _check_shape(str(key), value)
    # Tuples are arrays too when Python callers pass them.
    full = {
        **to_json(current),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
    }
    errors = sorted(
        Draft202012Validator(schema).iter_errors(full), key=lambda e: list(e.absolute_path)
    )
    if errors:
        # As for plugin configuration: the field and the rule, never the value sent.
        path, rule = describe_error(errors[0])
        raise ConfigError(path or "body", rule)
    return _converter.structure(full, type(current))
