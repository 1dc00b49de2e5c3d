"""The LLM contract: chat types, stream chunks, provider errors and the `Provider` protocol.

A plugin contributes a `ProviderType`; for each configured `ProviderInstance` the
kernel calls `factory(ctx, instance)` (`open_provider`) and gets a `Provider`, which
speaks these types, never a vendor SDK's. Reasoning ("thinking") is its own part of a
message (`ReasoningPart`), kept apart from the answer's text, with the signature or
opaque data a provider needs to get it back. The types live in `kernel.llm_types` and
the errors in `kernel.llm_errors`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs
import cattrs

from kernel.config import mapping_copy
from kernel.llm_errors import (
    ContextTooLongError,
    OutputTruncatedError,
    ProviderAuthError,
    ProviderBadRequestError,
    ProviderError,
    ProviderResponseError,
    ProviderServerError,
    ProviderUnreachableError,
    RateLimitedError,
    UnknownModelError,
)
from kernel.llm_types import (
    CONTENT_PARTS,
    STREAM_CHUNKS,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ContentPart,
    Finish,
    FinishReason,
    ImagePart,
    ReasoningDelta,
    ReasoningPart,
    Role,
    StreamChunk,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
    UsageChunk,
)
from kernel.messages import register_tagged_union

if TYPE_CHECKING:
    from kernel.context import PluginContext
    from kernel.kernel import Kernel

__all__ = [
    "CONTENT_PARTS",
    "STREAM_CHUNKS",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "ContentPart",
    "ContextTooLongError",
    "Finish",
    "FinishReason",
    "ImagePart",
    "ModelInfo",
    "OutputTruncatedError",
    "Provider",
    "ProviderAuthError",
    "ProviderBadRequestError",
    "ProviderError",
    "ProviderFactory",
    "ProviderHandle",
    "ProviderInstance",
    "ProviderResponseError",
    "ProviderServerError",
    "ProviderType",
    "ProviderUnreachableError",
    "RateLimitedError",
    "ReasoningDelta",
    "ReasoningPart",
    "ResponseAssembler",
    "Role",
    "StreamChunk",
    "TextDelta",
    "TextPart",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "UnknownModelError",
    "Usage",
    "UsageChunk",
    "open_provider",
    "register_llm_hooks",
]


@attrs.define
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = attrs.Factory(list)
    signature: str = ""


@attrs.define
class _PendingReasoning:
    text: list[str] = attrs.Factory(list)
    signature: str = ""
    redacted: str = ""


class ResponseAssembler:
    """Builds the `ChatResponse` a stream of chunks amounts to, as they arrive: text
    joined, reasoning blocks kept apart from it (by index), tool-call fragments joined
    by index, usage merged. `source` is recorded on the reasoning parts."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._text: list[str] = []
        self._reasoning: dict[int, _PendingReasoning] = {}
        self._calls: dict[int, _PendingCall] = {}
        self._usage = Usage()
        self._finish: Finish | None = None

    def feed(self, chunk: StreamChunk) -> None:
        """Take one chunk into account."""
        if isinstance(chunk, TextDelta):
            self._text.append(chunk.text)
        elif isinstance(chunk, ReasoningDelta):
            block = self._reasoning.setdefault(chunk.index, _PendingReasoning())
            block.text.append(chunk.text)
            block.signature = chunk.signature or block.signature
            block.redacted = chunk.redacted or block.redacted
        elif isinstance(chunk, ToolCallDelta):
            call = self._calls.setdefault(chunk.index, _PendingCall())
            # The first non-empty id and name win: some servers repeat them, some not.
            call.id = call.id or chunk.id
            call.name = call.name or chunk.name
            call.arguments.append(chunk.arguments)
            call.signature = chunk.signature or call.signature
        elif isinstance(chunk, UsageChunk):
            u, new = self._usage, chunk.usage
            self._usage = Usage(
                max(u.input_tokens, new.input_tokens),
                max(u.output_tokens, new.output_tokens),
                max(u.reasoning_tokens, new.reasoning_tokens),
                max(u.cached_tokens, new.cached_tokens),
            )
        else:
            self._finish = chunk

    @property
    def finished(self) -> bool:
        """Whether a `Finish` chunk arrived."""
        return self._finish is not None

    def response(self) -> ChatResponse:
        """The response so far; `ProviderResponseError` if the stream never said it was
        finished (it was cut off)."""
        if self._finish is None:
            raise ProviderResponseError(self.source, "the stream ended before the model finished")
        content: list[ContentPart] = [
            ReasoningPart("".join(r.text), r.signature, r.redacted, self.source)
            for _, r in sorted(self._reasoning.items())
        ]
        text = "".join(self._text)
        if text:
            content.append(TextPart(text))
        calls = tuple(
            ToolCall.parse(
                c.id or f"call_{index}", c.name, "".join(c.arguments), signature=c.signature
            )
            for index, c in sorted(self._calls.items())
        )
        finish = self._finish
        return ChatResponse(
            ChatMessage("assistant", content, calls),
            finish.reason,
            self._usage,
            model=finish.model,
            id=finish.id,
        )


async def collect(chunks: AsyncIterable[StreamChunk], *, source: str = "") -> ChatResponse:
    """Read a stream to its end and return the response it amounts to; the stream is
    closed (its HTTP request with it) however this ends."""
    assembler = ResponseAssembler(source)
    try:
        async for chunk in chunks:
            assembler.feed(chunk)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return assembler.response()


# ------------------------------------------------------------------ the protocol


@runtime_checkable
class Provider(Protocol):
    """One configured LLM provider instance."""

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Send `request` and return the whole answer; a `ProviderError` if it fails."""

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        """Send `request` and yield the answer as it comes, ending with a `Finish`
        (usage may follow it); a `ProviderError` if it fails. Closing the iterator early
        closes the request."""

    async def models(self) -> Sequence[ModelInfo]:
        """The models it serves (empty where the protocol cannot list them)."""

    async def aclose(self) -> None:
        """Release its connections; idempotent."""


@attrs.frozen
class ModelInfo:
    """A model a provider serves: its id (what `ChatRequest.model` takes), a display
    name, and its limits in tokens where the provider says."""

    id: str
    name: str = ""
    context_length: int | None = None
    max_output_tokens: int | None = None


@attrs.frozen
class ProviderInstance:
    """One configured instance of a provider type: its id, its type's name and its
    configuration (valid against the type's `config_schema`; holds its API keys)."""

    id: str
    type: str
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy, repr=False)
    name: str = ""


#: `factory(ctx, instance) -> Provider`, `ctx` being the contributing plugin's context.
ProviderFactory = Callable[["PluginContext", ProviderInstance], Provider]


@attrs.frozen
class ProviderType:
    """An LLM provider type a plugin contributes: `factory(ctx, instance)` builds a
    provider for an instance whose configuration `config_schema` validates."""

    name: str
    factory: ProviderFactory = attrs.field(repr=False)
    config_schema: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)
    description: str = ""


class ProviderHandle:
    """An opened provider instance. `close()` closes the provider; so does the disposal
    of the plugin that contributed its type."""

    def __init__(self, provider: Provider, instance: ProviderInstance) -> None:
        self.provider = provider
        self.instance = instance
        self._withdraw: Callable[[], None] = lambda: None
        self.closed = False

    async def close(self) -> None:
        """Close the provider; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._withdraw()
        await self.provider.aclose()


def open_provider(kernel: Kernel, instance: ProviderInstance) -> ProviderHandle:
    """Build `instance`'s provider with its type's factory, in the context of the plugin
    that contributed the type.

    Raises `LookupError` for an unknown type or a plugin that is not running, `TypeError`
    when the factory returns something that is not a `Provider`."""
    entry = kernel.provider_types.get(instance.type)
    if entry is None:
        raise LookupError(f"no LLM provider type {instance.type!r}")
    plugin = getattr(entry.generation, "ctx", None)
    if plugin is None or plugin.scope.closed:
        raise LookupError(
            f"LLM provider type {instance.type!r}: plugin {entry.owner!r} is not running"
        )
    provider = entry.item.factory(plugin, instance)
    if not isinstance(provider, Provider):
        raise TypeError(
            f"LLM provider type {instance.type!r}: factory returned {type(provider).__name__}, "
            "which lacks the Provider methods (chat, stream, models, aclose)"
        )
    handle = ProviderHandle(provider, instance)
    handle._withdraw = plugin.scope.on_dispose(handle.close, name=f"provider {instance.id}")
    return handle


def register_llm_hooks(conv: cattrs.Converter) -> None:
    """Teach `conv` the content parts and stream chunks: mappings with a `type` key."""
    register_tagged_union(conv, ContentPart, CONTENT_PARTS, "content part")
    register_tagged_union(conv, StreamChunk, STREAM_CHUNKS, "stream chunk")
