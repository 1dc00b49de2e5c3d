"""The LLM contract: chat types, stream chunks, provider errors and the `Provider` protocol.

A plugin contributes a `ProviderType`; for each configured `ProviderInstance` the
kernel calls `factory(ctx, instance)` (`open_provider`) and gets a `Provider`, which
speaks these types, never a vendor SDK's. Reasoning ("thinking") is its own part of a
message (`ReasoningPart`), kept apart from the answer's text, with the signature or
opaque data a provider needs to get it back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeAlias, runtime_checkable

import attrs
import cattrs

from kernel.config import str_tuple
from kernel.errors import NekoError
from kernel.messages import register_tagged_union
from kernel.tools import ToolDefinition

if TYPE_CHECKING:
    from kernel.context import PluginContext
    from kernel.kernel import Kernel

Role = Literal["system", "user", "assistant", "tool"]
#: Why the model stopped: `length` means it ran out of output tokens.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "other"]
ToolChoice = Literal["auto", "none", "required"]

_ROLES = ("system", "user", "assistant", "tool")


def _mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


# ------------------------------------------------------------------ content parts


@attrs.frozen
class TextPart:
    """Text of a message."""

    type: ClassVar[Literal["text"]] = "text"
    text: str


@attrs.frozen
class ImagePart:
    """An image given to the model: `url` is `http(s)://` or a `data:` URI."""

    type: ClassVar[Literal["image"]] = "image"
    url: str
    mime: str = ""
    detail: Literal["auto", "low", "high"] = "auto"


@attrs.frozen
class ReasoningPart:
    """What the model thought before answering (DeepSeek `reasoning_content`, Anthropic
    thinking blocks, Gemini thought parts). `signature` is the provider's seal on it
    (Anthropic, Gemini), `redacted` its opaque form when the provider hides the text
    (Anthropic `redacted_thinking`), `source` the provider type that produced it: a
    signature means nothing to another provider, which may reject it."""

    type: ClassVar[Literal["reasoning"]] = "reasoning"
    text: str = ""
    signature: str = ""
    redacted: str = ""
    source: str = ""


ContentPart: TypeAlias = TextPart | ImagePart | ReasoningPart

CONTENT_PARTS: Mapping[str, type[ContentPart]] = {
    c.type: c for c in (TextPart, ImagePart, ReasoningPart)
}


def _content(value: str | Iterable[ContentPart]) -> tuple[ContentPart, ...]:
    if isinstance(value, str):
        return (TextPart(value),) if value else ()
    return tuple(value)


# ------------------------------------------------------------------ messages


def _raw_arguments(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False, separators=(",", ":"))


@attrs.frozen
class ToolCall:
    """The model asks to run a tool: the call's `id` (a tool result answers it), the
    tool's `name`, its `arguments` parsed and as the model wrote them (`raw_arguments`).
    `error` says why `raw_arguments` could not be parsed (then `arguments` is empty and
    the model should be told, not the tool run). `signature` is provider data the call
    must carry back (Gemini's thought signature)."""

    id: str
    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)
    raw_arguments: str = attrs.field(
        default=attrs.Factory(_raw_arguments, takes_self=True), kw_only=True
    )
    error: str = attrs.field(default="", kw_only=True)
    signature: str = attrs.field(default="", kw_only=True)

    @classmethod
    def parse(cls, id: str, name: str, raw_arguments: str, *, signature: str = "") -> ToolCall:
        """A call whose arguments are JSON text as the model wrote it (never raises)."""
        error = ""
        arguments: Any = {}
        if raw_arguments.strip():
            try:
                arguments = json.loads(raw_arguments)
            except json.JSONDecodeError as exc:
                error = f"the arguments are not valid JSON ({exc.msg} at {exc.pos})"
                arguments = {}
            else:
                if not isinstance(arguments, dict):
                    error = f"the arguments are a JSON {type(arguments).__name__}, not an object"
                    arguments = {}
        return cls(
            id, name, arguments, raw_arguments=raw_arguments, error=error, signature=signature
        )


def _calls(value: Iterable[ToolCall]) -> tuple[ToolCall, ...]:
    return tuple(value)


def _tools(value: Iterable[ToolDefinition]) -> tuple[ToolDefinition, ...]:
    return tuple(value)


@attrs.frozen
class ChatMessage:
    """One message of a conversation with the model. `content` may be given as a str.
    An assistant message may carry `tool_calls`; a `tool` message is a tool's result
    and names the call it answers (`tool_call_id`) and the tool (`name`); for other
    roles `name` is an optional participant name."""

    role: Role
    content: tuple[ContentPart, ...] = attrs.field(default=(), converter=_content)
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=_calls)
    tool_call_id: str = ""
    name: str = ""

    def __attrs_post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(_ROLES)}, not {self.role!r}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot carry tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")

    @classmethod
    def system(cls, text: str) -> ChatMessage:
        """A system prompt."""
        return cls("system", text)

    @classmethod
    def user(cls, content: str | Iterable[ContentPart]) -> ChatMessage:
        """What the user said (text, or parts with images)."""
        return cls("user", content)

    @classmethod
    def assistant(
        cls, content: str | Iterable[ContentPart] = (), tool_calls: Iterable[ToolCall] = ()
    ) -> ChatMessage:
        """What the model said, and the tools it called."""
        return cls("assistant", content, tuple(tool_calls))

    @classmethod
    def tool_result(cls, call: ToolCall, content: str | Iterable[ContentPart]) -> ChatMessage:
        """A tool's answer to `call`."""
        return cls("tool", content, tool_call_id=call.id, name=call.name)

    @property
    def text(self) -> str:
        """The concatenated text parts (reasoning excluded)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def reasoning(self) -> str:
        """The concatenated text of the reasoning parts."""
        return "".join(p.text for p in self.content if isinstance(p, ReasoningPart))

    def without_reasoning(self) -> ChatMessage:
        """This message with its reasoning parts left out (for a provider that rejects
        another's, or to show a user only the answer)."""
        kept = tuple(p for p in self.content if not isinstance(p, ReasoningPart))
        return self if len(kept) == len(self.content) else attrs.evolve(self, content=kept)


def _messages(value: Iterable[ChatMessage]) -> tuple[ChatMessage, ...]:
    return tuple(value)


@attrs.frozen
class ChatRequest:
    """One request to a model. `model` empty means the provider instance's default;
    `stream_usage` asks a streaming provider to report token usage at the end; `extra`
    holds provider-specific parameters, passed on as they are."""

    messages: tuple[ChatMessage, ...] = attrs.field(converter=_messages)
    model: str = ""
    tools: tuple[ToolDefinition, ...] = attrs.field(default=(), converter=_tools)
    tool_choice: ToolChoice = "auto"
    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    stream_usage: bool = True
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)


@attrs.frozen
class Usage:
    """Tokens a request cost. `reasoning_tokens` are part of `output_tokens`,
    `cached_tokens` part of `input_tokens`."""

    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input and output together."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@attrs.frozen
class ChatResponse:
    """The model's answer: its `message` (role `assistant`), why it stopped, what it cost,
    and the model and response id the provider reported."""

    message: ChatMessage
    finish_reason: FinishReason = "stop"
    usage: Usage = Usage()
    model: str = ""
    id: str = ""

    @property
    def text(self) -> str:
        """The answer's text."""
        return self.message.text

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tools the model asked to run."""
        return self.message.tool_calls

    def require_answer(self, provider: str = "") -> ChatResponse:
        """This response, unless it is empty because the model ran out of output tokens
        (`OutputTruncatedError`): such a message must not enter a conversation's history."""
        if self.finish_reason == "length" and not self.text.strip() and not self.tool_calls:
            raise OutputTruncatedError(provider)
        return self


# ------------------------------------------------------------------ streaming


@attrs.frozen
class TextDelta:
    """More of the answer's text."""

    type: ClassVar[Literal["text"]] = "text"
    text: str


@attrs.frozen
class ReasoningDelta:
    """More of the model's reasoning. `index` tells reasoning blocks apart (a new index
    starts a new `ReasoningPart`); `signature` and `redacted` arrive whole."""

    type: ClassVar[Literal["reasoning"]] = "reasoning"
    text: str = ""
    signature: str = ""
    redacted: str = ""
    index: int = 0


@attrs.frozen
class ToolCallDelta:
    """A piece of tool call number `index`: its id and name (in the first piece, as a
    rule) and a fragment of its JSON arguments; fragments join in arrival order."""

    type: ClassVar[Literal["tool_call"]] = "tool_call"
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""
    signature: str = ""


@attrs.frozen
class UsageChunk:
    """Token usage so far. Providers report it in pieces (input first, output at the
    end), so each field keeps the largest value reported."""

    type: ClassVar[Literal["usage"]] = "usage"
    usage: Usage


@attrs.frozen
class Finish:
    """The model stopped, and why; the provider's model name and response id."""

    type: ClassVar[Literal["finish"]] = "finish"
    reason: FinishReason
    model: str = ""
    id: str = ""


StreamChunk: TypeAlias = TextDelta | ReasoningDelta | ToolCallDelta | UsageChunk | Finish

STREAM_CHUNKS: Mapping[str, type[StreamChunk]] = {
    c.type: c for c in (TextDelta, ReasoningDelta, ToolCallDelta, UsageChunk, Finish)
}


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


# ------------------------------------------------------------------ errors


class ProviderError(NekoError):
    """An LLM provider failed; the message is one sentence naming the provider, what
    went wrong and the provider's own words (`detail`). `retryable` errors may succeed
    later or on a fallback instance; the others will not (the request itself is wrong)."""

    code = "provider_error"
    retryable: ClassVar[bool] = False
    what: ClassVar[str] = "failed"

    def __init__(self, provider: str = "", detail: str = "", *, status: int | None = None) -> None:
        self.provider = provider
        self.detail = " ".join(detail.split())[:500]  # one line, and never a whole page
        self.status = status
        subject = f"LLM provider {provider!r}" if provider else "The LLM provider"
        message = f"{subject} {self._what()}"
        if self.detail:
            message += f": {self.detail}"
        super().__init__(message.rstrip(".") + ".")

    def _what(self) -> str:
        return self.what


class ProviderAuthError(ProviderError):
    """The provider refused the credentials (HTTP 401/403)."""

    code = "provider_auth"
    what = "refused the API key"


class UnknownModelError(ProviderError):
    """The provider does not serve the model asked for."""

    code = "provider_unknown_model"

    def __init__(self, provider: str = "", model: str = "", detail: str = "", **kw: Any) -> None:
        self.model = model
        super().__init__(provider, detail, **kw)

    def _what(self) -> str:
        return f"has no model {self.model!r}" if self.model else "does not know that model"


class RateLimitedError(ProviderError):
    """The provider asks us to slow down (HTTP 429); `retry_after` in seconds, if said."""

    code = "provider_rate_limited"
    retryable = True

    def __init__(
        self, provider: str = "", detail: str = "", *, retry_after: float | None = None, **kw: Any
    ) -> None:
        self.retry_after = retry_after
        super().__init__(provider, detail, **kw)

    def _what(self) -> str:
        if self.retry_after is None:
            return "is rate limiting requests"
        return f"is rate limiting requests (retry after {self.retry_after:g} s)"


class ProviderUnreachableError(ProviderError):
    """The provider could not be reached, or did not answer in time."""

    code = "provider_unreachable"
    retryable = True
    what = "could not be reached"


class ContextTooLongError(ProviderError):
    """The request holds more tokens than the model's context takes."""

    code = "provider_context_too_long"
    what = "was sent more than the model's context holds"


class ProviderBadRequestError(ProviderError):
    """The provider rejected the request as malformed (HTTP 400/422)."""

    code = "provider_bad_request"
    what = "rejected the request"


class ProviderServerError(ProviderError):
    """The provider failed on its side (HTTP 5xx)."""

    code = "provider_server_error"
    retryable = True

    def _what(self) -> str:
        return f"failed (HTTP {self.status})" if self.status else "failed on its side"


class ProviderResponseError(ProviderError):
    """The provider's answer could not be read (not JSON, not the protocol, cut off)."""

    code = "provider_bad_response"
    retryable = True
    what = "sent an answer that could not be read"


class OutputTruncatedError(ProviderError):
    """The model ran out of output tokens before it wrote any answer."""

    code = "provider_output_truncated"
    what = "stopped at the output token limit before answering (raise max_tokens)"


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
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping, repr=False)
    name: str = ""


#: `factory(ctx, instance) -> Provider`, `ctx` being the contributing plugin's context.
ProviderFactory = Callable[["PluginContext", ProviderInstance], Provider]


@attrs.frozen
class ProviderType:
    """An LLM provider type a plugin contributes: `factory(ctx, instance)` builds a
    provider for an instance whose configuration `config_schema` validates."""

    name: str
    factory: ProviderFactory = attrs.field(repr=False)
    config_schema: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)
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
