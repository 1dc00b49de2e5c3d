"""The chat types LLM providers speak: messages and their parts, tool calls, requests,
responses, token usage and stream chunks (all re-exported by `kernel.llm`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeAlias, get_args

import attrs

from kernel.config import mapping_copy, str_tuple
from kernel.llm_errors import OutputTruncatedError
from kernel.tools import ToolDefinition

Role = Literal["system", "user", "assistant", "tool"]
#: Why the model stopped: `length` means it ran out of output tokens.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "other"]
ToolChoice = Literal["auto", "none", "required"]

_ROLES: tuple[str, ...] = get_args(Role)


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
    arguments: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)
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
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)


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
