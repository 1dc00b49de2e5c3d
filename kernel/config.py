"""KernelConfig: how an embedding application (or `nekobot run`) sets up one Kernel."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs


def _paths(value: object) -> tuple[Path, ...]:
    if isinstance(value, str | Path):
        return (Path(value),)
    return tuple(Path(v) for v in value)  # type: ignore[attr-defined]


def _optional_names(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(value)  # type: ignore[arg-type]


def str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    """An attrs converter: any iterable of strings, kept as a tuple (typed, where
    `converter=tuple` would make the field's `__init__` parameter untyped)."""
    return tuple(values)


def mapping_copy(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """An attrs converter: a mapping (or None) copied into a dict of the field's own."""
    return dict(value or {})


@attrs.frozen
class BuiltinPlugin:
    """A plugin shipped with an application: its name, its importable module, and whether
    it is essential (cannot be disabled or deleted, so the API can never lock itself out).

    The kernel imports no plugin by name: a distribution lists its builtins in the
    `nekobot.builtins` entry-point group (NekoBot's own are `builtin_plugins:BUILTINS`),
    or an embedding application passes them as `KernelConfig.builtins`.
    """

    name: str
    module: str
    essential: bool = False


def _optional_builtins(value: object) -> tuple[BuiltinPlugin, ...] | None:
    if value is None:
        return None
    return tuple(value)  # type: ignore[arg-type]


@attrs.frozen
class KernelConfig:
    """Construction-time settings of one Kernel. Runtime settings live in its storage."""

    #: Everything the bot writes (database, logs, secrets, plugin data) goes here.
    data_dir: Path = attrs.field(default=Path("data"), converter=Path)
    #: Directories of user plugins; uploads go into the first one.
    plugin_dirs: tuple[Path, ...] = attrs.field(default=(Path("user_plugins"),), converter=_paths)
    #: The builtin plugins the application ships (None: those that installed distributions
    #: register in the `nekobot.builtins` entry-point group).
    builtins: tuple[BuiltinPlugin, ...] | None = attrs.field(
        default=None, converter=_optional_builtins
    )
    #: Which of the builtins to load, by name (None: all of them).
    builtin_plugins: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_names)
    #: Discover plugins of the `nekobot.plugins` entry-point group.
    entry_points: bool = True
    #: Host and port `nekobot run` serves on.
    host: str = "127.0.0.1"
    port: int = 6285
    #: Command prefixes when the stored bot config names none.
    command_prefixes: tuple[str, ...] = attrs.field(default=("/",), converter=str_tuple)
    #: Watch plugin directories and reload changed plugins (a stored setting overrides).
    hot_reload: bool = True
    #: Debounce of the file watcher, in milliseconds.
    reload_debounce_ms: int = 50
    #: Time bound of lifecycle and event hooks, and of each dispose step, in seconds.
    hook_timeout: float = 10.0
    #: Time bound of a command handler or message hook, in seconds.
    handler_timeout: float = 30.0
    #: How long a call through a service handle waits for its reloading provider, in seconds.
    service_timeout: float = 10.0
    #: The event loop counts as blocked after this many seconds without a tick.
    block_threshold: float = 0.5
    #: Start the loop-blocking watchdog thread.
    watchdog: bool = True
    #: Extra pip arguments for installing plugin dependencies (e.g. an index to use).
    pip_args: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    #: Log records kept in memory for the API.
    log_buffer: int = 5000
    #: Host names (besides the loopback ones and `host`) that requests may be addressed
    #: to (the `Host` header); others get 421, which stops DNS rebinding. `"*"`: any.
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    #: Addresses (or networks, `10.0.0.0/8`) of reverse proxies whose `X-Forwarded-For`
    #: and `X-Forwarded-Proto` are believed; none by default, so the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    #: Seconds a client has to send a request's headers (from connecting, or from the
    #: previous response) before the connection is closed.
    header_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    #: Open connections served at once; further ones are closed as soon as they are
    #: accepted (the limit is lowered to fit the process's file-descriptor limit).
    max_connections: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    #: Records of one kind (logger, level, message template) kept per interval; the rest
    #: are counted and reported in one line ("suppressed N similar messages").
    log_repeat_limit: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    log_repeat_interval: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
