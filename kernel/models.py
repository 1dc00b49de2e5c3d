"""Frozen attrs types that hooks return and receive, and the kernel's cattrs converter."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs
import cattrs

from kernel.adapter import PlatformType
from kernel.config import mapping_copy, str_tuple
from kernel.llm import ProviderType, register_llm_hooks
from kernel.messages import (
    Audio,
    ChatType,
    File,
    Forward,
    ForwardNode,
    Image,
    Mention,
    MentionAll,
    MessageEvent,
    Quote,
    Raw,
    Reply,
    Segment,
    Sender,
    Target,
    Text,
    Video,
    as_reply,
    register_message_hooks,
)

if TYPE_CHECKING:
    from kernel.context import PluginContext

# The message model and the platform and provider records live in their own modules;
# they are re-exported here, where hook signatures have always found them.
__all__ = [
    "Audio",
    "ChannelSpec",
    "ChatType",
    "CommandConflict",
    "CommandHandler",
    "CommandInvocation",
    "CommandSpec",
    "File",
    "Forward",
    "ForwardNode",
    "Image",
    "KernelEvent",
    "MCPServerSpec",
    "Mention",
    "MentionAll",
    "MessageEvent",
    "MiddlewareSpec",
    "OperationResult",
    "PlatformType",
    "PluginInfo",
    "PluginManifest",
    "PluginSource",
    "PluginState",
    "ProviderType",
    "Quote",
    "Raw",
    "Reply",
    "RouteSpec",
    "Segment",
    "Sender",
    "Target",
    "Text",
    "Video",
    "as_reply",
    "make_converter",
]


@attrs.frozen
class CommandInvocation:
    """What a command handler receives."""

    event: MessageEvent
    name: str
    args: str
    argv: tuple[str, ...]
    prefix: str
    ctx: PluginContext
    send: Callable[[Reply | str], Awaitable[None]] = attrs.field(repr=False)


CommandHandler = Callable[[CommandInvocation], Awaitable[Reply | str | None]]


@attrs.frozen
class CommandSpec:
    """A command a plugin contributes through `nekobot_commands`."""

    name: str
    handler: CommandHandler = attrs.field(repr=False)
    aliases: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    description: str = ""
    usage: str = ""
    platforms: tuple[str, ...] | None = None
    permission: Literal["everyone", "admin"] = "everyone"
    timeout: float | None = None


@attrs.frozen
class RouteSpec:
    """An HTTP route (or a WebSocket route with `websocket=True`) a plugin contributes."""

    path: str
    endpoint: Callable[..., Any] = attrs.field(repr=False)
    methods: tuple[str, ...] = attrs.field(default=("GET",), converter=str_tuple)
    public: bool = False
    name: str | None = None
    websocket: bool = False
    summary: str = ""
    openapi: Mapping[str, Any] | None = None
    #: The largest request body the endpoint may read, in bytes, or `body_limit(kernel)`
    #: for a limit read live; None: the `request_max_bytes` setting.
    body_limit: int | Callable[[Any], int] | None = attrs.field(default=None, repr=False)


@attrs.frozen
class MiddlewareSpec:
    """An ASGI middleware a plugin wraps around the kernel's app; lower `order` is outer."""

    name: str
    factory: Callable[[Any], Any] = attrs.field(repr=False)
    order: int = 0


@attrs.frozen
class ChannelSpec:
    """A WebSocket channel a plugin contributes to the `/ws` hub."""

    name: str
    description: str = ""
    on_subscribe: Callable[..., Awaitable[None]] | None = attrs.field(default=None, repr=False)
    on_message: Callable[..., Awaitable[None]] | None = attrs.field(default=None, repr=False)


@attrs.frozen
class MCPServerSpec:
    """An MCP server a plugin ships."""

    name: str
    transport: Literal["stdio", "sse", "streamable_http"]
    command: str | None = None
    args: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=mapping_copy)
    url: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=mapping_copy)


@attrs.frozen
class KernelEvent:
    """Something that happened in the kernel (plugin enabled, reload failed, ...)."""

    type: str
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)
    plugin: str | None = None
    time: float = attrs.field(factory=time.time)


class PluginSource(enum.Enum):
    """Where a plugin was discovered."""

    BUILTIN = "builtin"
    ENTRYPOINT = "entrypoint"
    USER = "user"


class PluginState(enum.Enum):
    """The lifecycle state of a plugin."""

    PENDING = "pending"
    LOADING = "loading"
    ACTIVE = "active"
    FAILED = "failed"
    UNLOADING = "unloading"
    DISPOSED = "disposed"


@attrs.frozen
class PluginManifest:
    """What a plugin says about itself in its `plugin.toml`."""

    name: str
    version: str
    description: str = ""
    author: str = ""
    nekobot: str = ""
    dependencies: tuple[str, ...] = ()
    config_schema: Mapping[str, Any] | None = None
    homepage: str = ""


@attrs.frozen
class CommandConflict:
    """Two or more plugins claim one command key."""

    key: str
    candidates: tuple[tuple[str, str], ...]
    holder: str
    resolution: str | None


@attrs.frozen
class ReloadFailure:
    """A reload that failed while the previous generation kept serving: what, and when."""

    message: str
    time: float


@attrs.frozen
class PluginInfo:
    """A snapshot of one plugin as the kernel sees it."""

    name: str
    version: str
    description: str
    author: str
    source: PluginSource
    essential: bool
    enabled: bool
    state: PluginState
    error: str | None
    commands: tuple[str, ...]
    routes: tuple[str, ...]
    hooks: tuple[str, ...]
    loaded_at: float | None
    reload_count: int
    path: str | None
    #: The names of the tools it offers the model (as it declares them).
    tools: tuple[str, ...] = ()
    #: The last reload that failed, until a load of the plugin succeeds.
    last_reload_error: ReloadFailure | None = None
    #: The command keys it contests with other plugins.
    conflicts: tuple[CommandConflict, ...] = ()


@attrs.frozen
class OperationResult:
    """The outcome of a lifecycle operation."""

    plugin: PluginInfo
    conflicts: tuple[CommandConflict, ...] = ()
    changed: bool = True


def make_converter() -> cattrs.Converter:
    """The kernel's converter: attrs types and enums to and from JSON-ready data."""
    conv = cattrs.Converter()
    conv.register_unstructure_hook(PluginSource, lambda v: v.value)
    conv.register_unstructure_hook(PluginState, lambda v: v.value)
    register_message_hooks(conv)
    register_llm_hooks(conv)
    return conv
