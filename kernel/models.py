"""Frozen attrs types that hooks return and receive, and the kernel's cattrs converter."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs
import cattrs

from kernel.config import str_tuple

if TYPE_CHECKING:
    from kernel.context import PluginContext

ChatType = Literal["private", "group", "channel"]


def _freeze_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


@attrs.frozen
class Segment:
    """One piece of a message: `text`, `mention`, `image`, `reply`, ... with its data."""

    type: str
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_mapping)

    @classmethod
    def text(cls, text: str) -> Segment:
        """A plain text segment."""
        return cls("text", {"text": text})

    @classmethod
    def mention(cls, user_id: str) -> Segment:
        """A mention of a user."""
        return cls("mention", {"user_id": user_id})

    @classmethod
    def image(cls, url: str) -> Segment:
        """An image by URL (or data: URI)."""
        return cls("image", {"url": url})


@attrs.frozen
class Sender:
    """Who sent a message."""

    id: str
    name: str = ""
    is_admin: bool = False


@attrs.frozen
class Target:
    """Where a message goes: one chat of one platform instance."""

    instance: str
    chat_type: ChatType
    chat_id: str


@attrs.frozen
class MessageEvent:
    """A message received by a platform adapter, in the kernel's own shape."""

    platform: str
    instance: str
    chat_type: ChatType
    chat_id: str
    sender: Sender
    segments: tuple[Segment, ...]
    id: str = ""
    time: float = attrs.field(factory=time.time)
    to_me: bool = False
    raw: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def text(self) -> str:
        """The concatenated text of the message's text segments."""
        return "".join(str(s.data.get("text", "")) for s in self.segments if s.type == "text")

    @property
    def target(self) -> Target:
        """Where a reply to this message goes."""
        return Target(self.instance, self.chat_type, self.chat_id)

    @property
    def conversation(self) -> tuple[str, str, str]:
        """The key that orders handling: messages of one conversation are handled in order."""
        return (self.instance, self.chat_type, self.chat_id)


@attrs.frozen
class Reply:
    """A message the bot sends."""

    segments: tuple[Segment, ...]

    @classmethod
    def text(cls, text: str) -> Reply:
        """A reply made of one text segment."""
        return cls((Segment.text(text),))

    @property
    def plain_text(self) -> str:
        """The concatenated text of the reply's text segments."""
        return "".join(str(s.data.get("text", "")) for s in self.segments if s.type == "text")


def as_reply(value: Reply | str | None) -> Reply | None:
    """Normalise a handler's return value (a Reply, a str, or None)."""
    if value is None or isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply.text(value) if value else None
    raise TypeError(f"a handler must return Reply, str or None, not {type(value).__name__}")


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
class PlatformType:
    """A chat platform type: `factory(ctx, instance)` returns an adapter."""

    name: str
    factory: Callable[..., Any] = attrs.field(repr=False)
    config_schema: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_mapping)
    description: str = ""


@attrs.frozen
class ProviderType:
    """An LLM provider type: `factory(ctx, instance)` returns a provider."""

    name: str
    factory: Callable[..., Any] = attrs.field(repr=False)
    config_schema: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_mapping)
    description: str = ""


@attrs.frozen
class MCPServerSpec:
    """An MCP server a plugin ships."""

    name: str
    transport: Literal["stdio", "sse", "streamable_http"]
    command: str | None = None
    args: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_mapping)
    url: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_mapping)


@attrs.frozen
class KernelEvent:
    """Something that happened in the kernel (plugin enabled, reload failed, ...)."""

    type: str
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_mapping)
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
    return conv
