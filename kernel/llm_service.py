"""The services that make the bot converse, as the plugins providing them meet:

- `LLMService` (the `llm` plugin): configured provider instances and calls to them,
  with fallbacks, key rotation and the logging of every call;
- `PersonalityService` (the `personalities` plugin): who the bot is in a conversation;
- `ConversationService` (the `conversations` plugin): the stored histories.

A consumer asks for one with `ctx.services.get(LLMService)`; to stream, it holds the
provider's generation for the whole stream, so that a reload of the `llm` plugin waits
for the stream instead of cutting it::

    async with ctx.services.handle(LLMService).use() as llm:
        async for chunk in llm.stream(request):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from kernel.config import mapping_copy, str_tuple
from kernel.llm import ChatMessage, ChatRequest, ChatResponse, ModelInfo, StreamChunk, Usage

__all__ = [
    "ConversationService",
    "FallbackStep",
    "LLMResult",
    "LLMService",
    "LLMStream",
    "NoProviderError",
    "Personality",
    "PersonalityService",
    "ProviderSummary",
]


class NoProviderError(LookupError):
    """No provider instance answers: the id names none, it is disabled, or none is
    configured (the message says which, in one sentence)."""


@attrs.frozen
class ProviderSummary:
    """A configured provider instance as consumers see it (no secrets)."""

    id: str
    type: str
    name: str
    model: str
    enabled: bool = True
    is_default: bool = False
    #: The instances tried, in order, when this one is rate limited, failing or down.
    fallbacks: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)


@attrs.frozen
class FallbackStep:
    """A provider instance that was tried and failed before the one that answered, and
    why (the error's one sentence)."""

    provider_id: str
    error: str


@attrs.frozen
class LLMResult:
    """A call's answer and how it was obtained: the provider instance and model that
    answered, the ones tried before it (`fallbacks`), and how long it took in seconds
    (`first_token` for a stream: until its first piece of text or reasoning)."""

    response: ChatResponse
    provider_id: str
    model: str
    latency: float = 0.0
    first_token: float | None = None
    fallbacks: tuple[FallbackStep, ...] = ()

    @property
    def text(self) -> str:
        """The answer's text."""
        return self.response.text

    @property
    def usage(self) -> Usage:
        """The tokens it cost."""
        return self.response.usage


class LLMStream(Protocol):
    """A streamed call: the chunks as they come (`TextDelta`, `ReasoningDelta`,
    `ToolCallDelta`, `UsageChunk`, ending with `Finish`), then `result`. Before the first
    chunk the service may still fall back to another instance (`provider_id` says which
    one is answering); after it, a failure is the stream's exception. `aclose()` (or
    leaving an `async for` early) closes the provider's HTTP request."""

    def __aiter__(self) -> AsyncIterator[StreamChunk]: ...

    async def __anext__(self) -> StreamChunk: ...

    @property
    def provider_id(self) -> str:
        """The instance answering (empty until the request was sent)."""

    @property
    def result(self) -> LLMResult:
        """The whole answer; `RuntimeError` before the stream has ended."""

    async def aclose(self) -> None:
        """Stop reading and close the request; idempotent."""


@runtime_checkable
class LLMService(Protocol):
    """Configured LLM provider instances (the `llm` plugin).

    `provider_id` None means the default instance: bot config's `default_provider`, or
    the only enabled instance when exactly one is configured. Calls raise
    `NoProviderError` when there is none, a `kernel.llm.ProviderError` when the instance
    and its fallbacks all failed (an empty answer cut by the output limit is
    `OutputTruncatedError`: it must not enter a history). Every call is logged and
    published on the `events` channel (`llm.response` / `llm.error`).
    """

    def providers(self) -> Sequence[ProviderSummary]:
        """The configured instances."""

    def default_provider_id(self) -> str | None:
        """The instance used when a call names none, or None."""

    async def chat(self, request: ChatRequest, *, provider_id: str | None = None) -> LLMResult:
        """The whole answer to `request`."""

    def stream(self, request: ChatRequest, *, provider_id: str | None = None) -> LLMStream:
        """The answer to `request` as it comes (the request is sent on the first read)."""

    async def models(self, provider_id: str | None = None) -> Sequence[ModelInfo]:
        """The models the instance serves (empty where its protocol cannot list them)."""


def _messages(value: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    return tuple(value)


def _allow_list(value: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if value is None else str_tuple(value)


@attrs.frozen
class Personality:
    """Who the bot is: a system prompt, an optional greeting (the first thing it says in
    a new conversation), optional example dialogue (user and assistant turns placed after
    the prompt) and an optional tool allow-list (None: every tool; empty: none)."""

    id: str
    name: str
    prompt: str
    description: str = ""
    greeting: str = ""
    examples: tuple[ChatMessage, ...] = attrs.field(default=(), converter=_messages)
    tools: tuple[str, ...] | None = attrs.field(default=None, converter=_allow_list)
    is_default: bool = False
    extra: Mapping[str, Any] = attrs.field(factory=dict, converter=mapping_copy)

    def preamble(self) -> tuple[ChatMessage, ...]:
        """What a request starts with: the system prompt, then the example dialogue."""
        head = (ChatMessage.system(self.prompt),) if self.prompt else ()
        return head + self.examples

    def allows_tool(self, name: str) -> bool:
        """Whether the allow-list lets the model see tool `name`."""
        return self.tools is None or name in self.tools


@runtime_checkable
class PersonalityService(Protocol):
    """The stored personalities (the `personalities` plugin); exactly one is the default
    while any exists."""

    async def get(self, key: str) -> Personality | None:
        """The personality with id `key`, else the one named `key` (case-insensitive)."""

    async def default(self) -> Personality | None:
        """The default personality, or None when there is none."""

    async def list(self) -> Sequence[Personality]:
        """Every personality, by name."""


@runtime_checkable
class ConversationService(Protocol):
    """The LLM conversations' stored histories (the `conversations` plugin). A chat is
    a platform instance and a chat id; in a group with per-user histories it holds one
    conversation per user."""

    async def history(
        self, instance: str, chat_id: str, user_id: str = ""
    ) -> Sequence[ChatMessage]:
        """The messages the model is shown for that conversation, oldest first."""

    async def forget(self, instance: str, chat_id: str) -> int:
        """Delete every conversation of the chat (all its users); how many messages went."""
