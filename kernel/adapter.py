"""The platform contract: what a platform type's factory returns, and what it receives.

A plugin contributes a `PlatformType`; for each configured `PlatformInstance` the
kernel calls `factory(PlatformContext, PlatformInstance)` (`open_platform`), and the
`Adapter` it returns speaks the kernel's message model both ways: it delivers each
received `MessageEvent` with `await ctx.deliver(event)`, and the kernel calls
`await adapter.send(target, reply)` with replies already fitted to the adapter's
`capabilities` (segments it cannot send turned into text, long texts split).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import attrs

from kernel.config import mapping_copy
from kernel.messages import (
    SEGMENT_TYPES,
    Forward,
    MessageEvent,
    Raw,
    Reply,
    ReplyStream,
    Segment,
    Target,
    Text,
    degrade,
)

if TYPE_CHECKING:
    import logging

    from kernel.context import PluginContext
    from kernel.kernel import Kernel


def _segment_types(value: Iterable[str]) -> frozenset[str]:
    types = frozenset(value) | {"text"}  # every adapter sends text: it is what degrades to
    unknown = types - SEGMENT_TYPES.keys()
    if unknown:
        raise ValueError(f"unknown segment types in capabilities: {', '.join(sorted(unknown))}")
    return types


@attrs.frozen
class SendResult:
    """What a send produced: the platform's id of each message it sent (a reply split in
    several messages has several)."""

    message_ids: tuple[str, ...] = ()

    def __add__(self, other: SendResult) -> SendResult:
        return SendResult(self.message_ids + other.message_ids)


@attrs.frozen
class Capabilities:
    """What an adapter can send: segment `type`s (text always), the `Raw` kinds of its
    platform (`any_raw_kind`: all of them), and the longest text one message may carry
    (`None`: no limit)."""

    segments: frozenset[str] = attrs.field(default=frozenset(), converter=_segment_types)
    raw_kinds: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    max_text_length: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    any_raw_kind: bool = False

    @classmethod
    def everything(cls) -> Capabilities:
        """An adapter that sends every segment as it is (a mock, a loopback)."""
        return cls(frozenset(SEGMENT_TYPES), any_raw_kind=True)

    def fits(self, segment: Segment) -> bool:
        """Whether the adapter can send `segment` as it is (a forward's nodes aside)."""
        if isinstance(segment, Raw):
            return "raw" in self.segments and (self.any_raw_kind or segment.kind in self.raw_kinds)
        return segment.type in self.segments

    def fit(self, reply: Reply) -> tuple[Reply, ...]:
        """`reply` as the messages the adapter can send: unsupported segments as text
        (`kernel.messages.degrade`), then split where text exceeds `max_text_length`.
        An empty tuple if nothing is left to send."""
        segments = reply.segments
        limit = self.max_text_length
        # The common reply (supported segments, short text) passes untouched and unbuilt.
        if all(self.fits(s) and not isinstance(s, Forward) for s in segments) and (
            limit is None or sum(len(s.text) for s in segments if isinstance(s, Text)) <= limit
        ):
            return (reply,) if segments else ()
        segments = degrade(segments, self.segments, _Kinds(self))
        if limit is None:
            return (Reply(segments),) if segments else ()
        return tuple(Reply(part) for part in _split(segments, limit))


class _Kinds:
    """The raw kinds `capabilities` sends, as a container for `degrade`."""

    __slots__ = ("caps",)

    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps

    def __contains__(self, kind: object) -> bool:
        return self.caps.any_raw_kind or kind in self.caps.raw_kinds


def _split(segments: Sequence[Segment], limit: int) -> list[tuple[Segment, ...]]:
    """Pack `segments` into messages of at most `limit` characters of text, breaking a
    long text at a newline or space where one is near the limit."""
    parts: list[tuple[Segment, ...]] = []
    current: list[Segment] = []
    room = limit
    for seg in segments:
        if not isinstance(seg, Text):
            current.append(seg)
            continue
        text = seg.text
        while len(text) > room:
            cut = _break_at(text, room)
            if cut:
                current.append(Text(text[:cut]))
            parts.append(tuple(current))
            current, room = [], limit
            text = text[cut:].lstrip(" \n") if cut else text
        if text:
            current.append(Text(text))
            room -= len(text)
    if current:
        parts.append(tuple(current))
    return [p for p in parts if p]


def _break_at(text: str, room: int) -> int:
    """Where to cut `text` to fit `room`: at the last newline or space in the second half
    of the window (it is dropped), else at `room` exactly (0 when no room is left)."""
    if room <= 0:
        return 0
    window = text[: room + 1]
    for sep in ("\n", " "):
        at = window.rfind(sep)
        if at >= room // 2:
            return at
    return room


AdapterStatus = Literal["stopped", "starting", "running", "reconnecting", "down"]


@attrs.frozen
class AdapterStats:
    """A snapshot of one platform instance: its `status`, the messages it received and
    sent, the sends that failed (`errors`, the latest in `last_error`), when it started
    (Unix time) and how often it reconnected."""

    status: AdapterStatus = "stopped"
    received: int = 0
    sent: int = 0
    errors: int = 0
    last_error: str | None = None
    started_at: float | None = None
    reconnects: int = 0


class StatsRecorder:
    """The running counts behind `AdapterStats`. The kernel counts what passes through
    it (received through `PlatformContext.deliver`, sent and failed through the
    pipeline); the adapter reports its connection's state with `set_status`,
    `reconnected` and `error`."""

    def __init__(self) -> None:
        self.status: AdapterStatus = "stopped"
        self.received = 0
        self.sent = 0
        self.errors = 0
        self.last_error: str | None = None
        self.started_at: float | None = None
        self.reconnects = 0

    def set_status(self, status: AdapterStatus) -> None:
        """Record the connection's state; `running` after `stopped` marks a start."""
        if status == "running" and self.status in ("stopped", "starting"):
            self.started_at = time.time()
        self.status = status

    def reconnected(self) -> None:
        """Count a reconnection (the connection dropped and came back)."""
        self.reconnects += 1

    def error(self, error: BaseException | str) -> None:
        """Count a failure; `last_error` becomes its one-line description."""
        self.errors += 1
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.last_error = " ".join(error.split())[:300]  # one line for a stats table

    def snapshot(self) -> AdapterStats:
        """The counts as they are now."""
        return AdapterStats(
            self.status,
            self.received,
            self.sent,
            self.errors,
            self.last_error,
            self.started_at,
            self.reconnects,
        )


@runtime_checkable
class Adapter(Protocol):
    """One running platform instance: a connection to a chat platform."""

    @property
    def capabilities(self) -> Capabilities:
        """What it can send; the kernel fits every reply to it before `send`."""

    @property
    def stats(self) -> AdapterStats:
        """A snapshot of its counts and connection state."""

    async def start(self) -> None:
        """Connect (or start listening) and return; run background work through the
        plugin's context (`ctx.plugin.start_task`) so that it ends with the plugin."""

    async def stop(self) -> None:
        """Disconnect and release every socket and task; idempotent."""

    async def send(self, target: Target, reply: Reply) -> SendResult:
        """Deliver `reply` (already fitted to `capabilities`) to `target`."""


@runtime_checkable
class SupportsCallApi(Protocol):
    """An adapter whose platform has actions beyond sending (OneBot's `get_group_list`,
    ...): a plugin that knows the platform calls them by name."""

    async def call_api(self, name: str, params: Mapping[str, Any]) -> Any:
        """Call the platform action `name`; its result, or an exception saying why not."""


@runtime_checkable
class SupportsStreaming(Protocol):
    """An adapter that can show a reply while it is produced (the web chat's Server-Sent
    Events; a platform that edits a message as it grows). Others get the whole text."""

    async def send_stream(self, target: Target, stream: ReplyStream) -> SendResult:
        """Read `stream` to its end (or until it raises, letting the exception through),
        delivering its pieces to `target` as they come."""


@attrs.frozen
class PlatformInstance:
    """One configured instance of a platform type: its id (the `instance` of the events
    and targets it handles), its type's name and its configuration (valid against the
    type's `config_schema`; it may hold tokens, so the repr leaves it out)."""

    id: str
    type: str
    # Not in the repr: a configuration holds the platform's tokens.
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy, repr=False)
    name: str = ""


class PlatformContext:
    """What a platform type's factory receives besides the instance: the owning
    plugin's context, the instance's stats and the way into the message pipeline."""

    def __init__(self, kernel: Kernel, plugin: PluginContext, instance: PlatformInstance) -> None:
        self._kernel = kernel
        self.plugin = plugin
        self.instance = instance
        self.stats = StatsRecorder()
        self.adapter: Adapter | None = None
        self.closed = False

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """The owning plugin's logger."""
        return self.plugin.log

    async def deliver(self, event: MessageEvent) -> int:
        """Hand a received message to the pipeline and wait until it is handled (its
        replies go back through this instance's adapter); returns the replies sent."""
        if self.adapter is None:
            raise RuntimeError("deliver() before the factory returned the adapter")
        if self.closed:
            # stop() must end the reading before it returns; a message read after it
            # would be answered through an adapter that is gone.
            raise RuntimeError(f"platform instance {self.instance.id!r} is closed")
        if event.instance != self.instance.id:
            raise ValueError(
                f"event of instance {event.instance!r} delivered by {self.instance.id!r}"
            )
        self.stats.received += 1
        return await self._kernel.pipeline.dispatch(event, self.adapter)


#: `factory(ctx, instance) -> Adapter`: builds an instance's adapter; does not start it.
PlatformFactory = Callable[[PlatformContext, PlatformInstance], Adapter]


@attrs.frozen
class PlatformType:
    """A chat platform type a plugin contributes: `factory(ctx, instance)` builds an
    adapter for an instance whose configuration `config_schema` validates."""

    name: str
    factory: PlatformFactory = attrs.field(repr=False)
    config_schema: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)
    description: str = ""


class PlatformHandle:
    """An opened platform instance: its adapter, attached to the pipeline, and its
    context. `close()` stops the adapter and detaches it; so does the owning plugin's
    disposal."""

    def __init__(
        self, context: PlatformContext, adapter: Adapter, detach: Callable[[], None]
    ) -> None:
        self.context = context
        self.adapter = adapter
        self._detach = detach
        self._withdraw: Callable[[], None] = lambda: None
        self.closed = False

    @property
    def stats(self) -> AdapterStats:
        """The adapter's stats."""
        return self.adapter.stats

    async def close(self) -> None:
        """Stop the adapter and detach it from the pipeline; idempotent."""
        if self.closed:
            return
        self.closed = self.context.closed = True
        self._withdraw()
        try:
            await self.adapter.stop()
        finally:
            self._detach()


def open_platform(kernel: Kernel, instance: PlatformInstance) -> PlatformHandle:
    """Build `instance`'s adapter with its type's factory (in the context of the plugin
    that contributed the type) and attach it to the pipeline; the caller starts it.

    Raises `LookupError` for an unknown type or a plugin that is not running,
    `ValueError` for an instance id already open, `TypeError` when the factory returns
    something that is not an `Adapter`."""
    entry = kernel.platform_types.get(instance.type)
    if entry is None:
        raise LookupError(f"no platform type {instance.type!r}")
    plugin = getattr(entry.generation, "ctx", None)
    if plugin is None or plugin.scope.closed:
        raise LookupError(f"platform type {instance.type!r}: plugin {entry.owner!r} is not running")
    if instance.id in kernel.pipeline.adapters:
        raise ValueError(f"platform instance {instance.id!r} already has an adapter")
    context = PlatformContext(kernel, plugin, instance)
    adapter = entry.item.factory(context, instance)
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"platform type {instance.type!r}: factory returned {type(adapter).__name__}, "
            "which lacks the Adapter methods (start, stop, send, capabilities, stats)"
        )
    context.adapter = adapter
    detach = kernel.pipeline.attach(instance.id, adapter, stats=context.stats)
    handle = PlatformHandle(context, adapter, detach)
    handle._withdraw = plugin.scope.on_dispose(handle.close, name=f"platform {instance.id}")
    return handle
