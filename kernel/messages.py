"""The message model every platform speaks: typed segments, senders, events and replies.

An adapter turns its platform's payloads into these types and back, so that no
platform's own types reach plugins. A segment the model has no class for is kept as
`Raw` (its platform's kind and data) so that nothing is lost on the way through.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Container, Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeAlias

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn

from kernel.config import mapping_copy

ChatType = Literal["private", "group", "channel"]


def _media_label(kind: str, url: str, name: str) -> str:
    """`[image: cat.png]`: what a client without that media type is shown instead."""
    # A data: or file: URL is useless (or private) on another platform; an http one helps.
    label = name or (url if url.startswith(("http://", "https://")) else "")
    return f"[{kind}: {label}]" if label else f"[{kind}]"


@attrs.frozen
class Text:
    """Plain text."""

    type: ClassVar[Literal["text"]] = "text"
    text: str

    def as_text(self) -> str:
        """The segment as plain text."""
        return self.text


@attrs.frozen
class Mention:
    """A mention of one user (`@name`); `name` is what a text-only client shows."""

    type: ClassVar[Literal["mention"]] = "mention"
    user_id: str
    name: str = ""

    def as_text(self) -> str:
        """The segment as plain text."""
        return f"@{self.name or self.user_id}"


@attrs.frozen
class MentionAll:
    """A mention of everyone in the chat."""

    type: ClassVar[Literal["mention_all"]] = "mention_all"

    def as_text(self) -> str:
        """The segment as plain text."""
        return "@all"


@attrs.frozen
class Quote:
    """The message this one answers (the platform's "reply to"), by its message id."""

    type: ClassVar[Literal["quote"]] = "quote"
    message_id: str
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)

    def as_text(self) -> str:
        """A quote has no text of its own: a text-only client drops it."""
        return ""


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@attrs.frozen
class _Media:
    """What every media segment has: `url` (`http(s)://`, `file://` or a `data:` URI),
    a display `name`, `mime`, `size`, the platform's own handle `file_id`, and `extra`
    for platform-only fields. The subclasses give the `type` tag."""

    type: ClassVar[str]
    url: str = ""
    name: str = ""
    mime: str = ""
    size: int | None = None
    file_id: str = ""
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)

    def as_text(self) -> str:
        """The segment as plain text."""
        return _media_label(self.type, self.url, self.name)


@attrs.frozen
class Image(_Media):
    """An image. `url` is `http(s)://`, `file://` or a `data:` URI; `file_id` is the
    platform's own handle for it, if it has one; `extra` keeps platform-only fields."""

    type: ClassVar[Literal["image"]] = "image"

    @classmethod
    def from_bytes(cls, data: bytes, mime: str = "image/png", name: str = "") -> Image:
        """An image carried inline, as a `data:` URI."""
        return cls(_data_url(data, mime), name=name, mime=mime, size=len(data))


@attrs.frozen
class File(_Media):
    """A file, addressed like an `Image`."""

    type: ClassVar[Literal["file"]] = "file"


@attrs.frozen
class Audio(_Media):
    """A voice message or audio clip, addressed like an `Image`; `duration` in seconds."""

    type: ClassVar[Literal["audio"]] = "audio"
    duration: float | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Video(_Media):
    """A video, addressed like an `Image`; `duration` in seconds."""

    type: ClassVar[Literal["video"]] = "video"
    duration: float | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ForwardNode:
    """One message of a forwarded bundle: who said it and what, or just its message id
    (`message_id`) when the platform forwards by reference."""

    sender: Sender | None = None
    segments: tuple[Segment, ...] = ()
    message_id: str = ""
    time: float | None = None

    def as_text(self) -> str:
        """`name: text`, the node as one line of plain text."""
        text = "".join(s.as_text() for s in self.segments)
        who = self.sender.name or self.sender.id if self.sender is not None else ""
        return f"{who}: {text}" if who else text


@attrs.frozen
class Forward:
    """A bundle of forwarded messages: its `nodes`, or only the platform's `id` for it
    (an incoming forward that the adapter has not fetched)."""

    type: ClassVar[Literal["forward"]] = "forward"
    nodes: tuple[ForwardNode, ...] = ()
    id: str = ""

    def as_text(self) -> str:
        """The forwarded messages one per line, or `[forwarded messages]`."""
        lines = [line for node in self.nodes if (line := node.as_text())]
        return "\n".join(lines) if lines else "[forwarded messages]"


@attrs.frozen
class Raw:
    """A platform segment the model has no class for (a QQ face, a JSON card, a
    sticker): the platform's `kind` and `data`, kept whole, and the `fallback` text a
    platform that cannot send it shows instead (nothing, if empty)."""

    type: ClassVar[Literal["raw"]] = "raw"
    kind: str
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)
    fallback: str = ""

    def as_text(self) -> str:
        """The segment as plain text: its fallback."""
        return self.fallback


#: One piece of a message.
Segment: TypeAlias = (
    Text | Mention | MentionAll | Quote | Image | File | Audio | Video | Forward | Raw
)

#: The segment classes by their `type` tag (the discriminator in serialised form).
SEGMENT_TYPES: Mapping[str, type[Segment]] = {
    cls.type: cls
    for cls in (Text, Mention, MentionAll, Quote, Image, File, Audio, Video, Forward, Raw)
}


def _segments(value: Iterable[Segment]) -> tuple[Segment, ...]:
    return tuple(value)


def plain_text(segments: Iterable[Segment]) -> str:
    """The concatenated text of the `Text` segments (what commands are parsed from)."""
    return "".join(s.text for s in segments if isinstance(s, Text))


@attrs.frozen
class Sender:
    """Who sent a message."""

    id: str
    name: str = ""
    is_admin: bool = False


@attrs.frozen
class Target:
    """Where a message goes: one chat of one platform instance (and, on an instance that
    serves several bot accounts, the account `self_id` that sends)."""

    instance: str
    chat_type: ChatType
    chat_id: str
    self_id: str = ""


@attrs.frozen
class MessageEvent:
    """A message received by a platform adapter, in the kernel's own shape. `raw` is the
    platform's payload, for the adapter's own use; plugins should not need it."""

    platform: str
    instance: str
    chat_type: ChatType
    chat_id: str
    sender: Sender
    segments: tuple[Segment, ...] = attrs.field(converter=_segments)
    id: str = ""
    time: float = attrs.field(factory=time.time)
    to_me: bool = False
    self_id: str = ""
    raw: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def text(self) -> str:
        """The concatenated text of the message's text segments."""
        return plain_text(self.segments)

    @property
    def target(self) -> Target:
        """Where a reply to this message goes."""
        return Target(self.instance, self.chat_type, self.chat_id, self.self_id)

    @property
    def conversation(self) -> tuple[str, str, str]:
        """The key that orders handling: messages of one conversation are handled in order."""
        return (self.instance, self.chat_type, self.chat_id)


@attrs.frozen
class Reply:
    """A message the bot sends, made of the same segments as a received one (any
    iterable of them: `Reply([Mention("42"), Text(" hi")])`)."""

    segments: tuple[Segment, ...] = attrs.field(converter=_segments)

    @classmethod
    def text(cls, text: str) -> Reply:
        """A reply made of one text segment."""
        return cls((Text(text),))

    @property
    def plain_text(self) -> str:
        """The concatenated text of the reply's text segments."""
        return plain_text(self.segments)


class ReplyStream:
    """A text reply sent while it is being produced (an LLM's answer, token by token).

    `pieces` yields the text in order. An adapter that can show a reply as it grows
    (`kernel.adapter.SupportsStreaming`) receives the stream itself; for any other the
    pipeline reads it to its end and sends the whole text as one reply. `metadata` is
    what the producer adds by the time the last piece has been read (e.g. the token
    usage), `text` the text read so far, `done` whether the pieces ran out normally. An
    exception raised by `pieces` reaches whoever reads the stream, then the handler that
    sent it. A stream is read once.
    """

    __slots__ = ("_parts", "_pieces", "_read", "done", "metadata")

    def __init__(self, pieces: AsyncIterable[str]) -> None:
        self._pieces = pieces
        self._parts: list[str] = []
        self._read = False
        self.done = False
        self.metadata: dict[str, Any] = {}

    @property
    def text(self) -> str:
        """The text read so far (the whole reply once `done`)."""
        return "".join(self._parts)

    def __aiter__(self) -> AsyncIterator[str]:
        if self._read:
            raise RuntimeError("a ReplyStream is read once")
        self._read = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        pieces = self._pieces
        try:
            async for piece in pieces:
                if piece:
                    self._parts.append(piece)
                    yield piece
            self.done = True
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()

    async def drain(self) -> str:
        """Read the rest of the stream; the whole text."""
        async for _ in self:
            pass
        return self.text


def as_reply(value: Reply | str | None) -> Reply | None:
    """Normalise a handler's return value (a Reply, a str, or None)."""
    if value is None or isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply.text(value) if value else None
    raise TypeError(f"a handler must return Reply, str or None, not {type(value).__name__}")


# ------------------------------------------------------------------ degrading


def degrade(
    segments: Iterable[Segment], supported: Container[str], raw_kinds: Container[str] = ()
) -> tuple[Segment, ...]:
    """`segments` with each one whose type is not in `supported` (nor, for a `Raw`, its
    kind in `raw_kinds`) replaced by its text (`[image: cat.png]`, `@name`, a forward's
    lines, a raw segment's fallback); adjacent texts are merged. Text is always sent."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Forward) and "forward" in supported:
            nodes = tuple(
                attrs.evolve(n, segments=degrade(n.segments, supported, raw_kinds))
                for n in seg.nodes
            )
            seg = attrs.evolve(seg, nodes=nodes)
        elif not _sendable(seg, supported, raw_kinds):
            seg = Text(seg.as_text())
        if isinstance(seg, Text):
            if not seg.text:
                continue
            if out and isinstance(out[-1], Text):
                out[-1] = Text(out[-1].text + seg.text)
                continue
        out.append(seg)
    return tuple(out)


def _sendable(seg: Segment, supported: Container[str], raw_kinds: Container[str]) -> bool:
    if isinstance(seg, Text):
        return True
    if isinstance(seg, Raw):
        return "raw" in supported and seg.kind in raw_kinds
    return seg.type in supported


# ------------------------------------------------------------------ serialising


def register_message_hooks(conv: cattrs.Converter) -> None:
    """Teach `conv` the segments: each (un)structures as a mapping whose `type` names its
    class (`{"type": "text", "text": "hi"}`); fields left at their default are omitted."""
    register_tagged_union(conv, Segment, SEGMENT_TYPES, "segment")


def register_tagged_union(
    conv: cattrs.Converter, union: Any, classes: Mapping[str, type], what: str
) -> None:
    """(Un)structure the attrs classes of `union` as mappings with a `type` key naming the
    class (`classes` maps each tag to its class); defaults are left out. `what` names a
    member in the error for an unknown tag."""
    unstructure: dict[type, Callable[[Any], dict[str, Any]]] = {}
    structure: dict[str, Callable[[Any, Any], Any]] = {}

    def structure_member(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"a {what} must be an object, not {type(value).__name__}")
        tag = value.get("type")
        if not isinstance(tag, str) or tag not in structure:
            raise ValueError(f"unknown {what} type {tag!r} (known: {', '.join(classes)})")
        return structure[tag](value, classes[tag])

    # The union hooks first: a member may hold members (a forward's nodes hold segments),
    # so the per-class functions made below look them up.
    conv.register_structure_hook_func(lambda t: t == union, structure_member)
    conv.register_unstructure_hook_func(lambda t: t == union, lambda v: unstructure[type(v)](v))
    for tag, cls in classes.items():
        fn: Callable[[Any], dict[str, Any]] = make_dict_unstructure_fn(
            cls, conv, _cattrs_omit_if_default=True
        )
        unstructure[cls] = _tagged(tag, fn)
        conv.register_unstructure_hook(cls, unstructure[cls])
        structure[tag] = make_dict_structure_fn(cls, conv)


def _tagged(tag: str, fn: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    def unstructure(value: Any) -> dict[str, Any]:
        return {"type": tag, **fn(value)}

    return unstructure
