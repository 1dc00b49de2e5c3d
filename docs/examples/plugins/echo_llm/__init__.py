"""An LLM provider without a model: it answers with the user's last message, streamed
word by word, and calls a tool when the message is `!tool_name {json arguments}`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from kernel import PluginContext, hookimpl
from kernel.llm import (
    ChatRequest,
    ChatResponse,
    Finish,
    ModelInfo,
    ProviderBadRequestError,
    ProviderInstance,
    ProviderType,
    StreamChunk,
    TextDelta,
    ToolCallDelta,
    Usage,
    UsageChunk,
    collect,
)


class EchoProvider:
    """One echo instance; its config may set a `prefix` for every answer."""

    def __init__(self, ctx: PluginContext, instance: ProviderInstance) -> None:
        self.prefix = str(instance.config.get("prefix", ""))

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return await collect(self.stream(request), source="echo")

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        if not request.messages or request.messages[-1].role != "user":
            raise ProviderBadRequestError("echo", "the last message must be the user's")
        said = request.messages[-1].text
        model = request.model or "echo-1"
        name, _, arguments = said.removeprefix("!").partition(" ")
        if said.startswith("!") and name in {tool.name for tool in request.tools}:
            # The arguments arrive in two fragments, as a real model's do.
            half = len(arguments) // 2
            yield ToolCallDelta(0, id="call_1", name=name, arguments=arguments[:half])
            yield ToolCallDelta(0, arguments=arguments[half:])
            yield Finish("tool_calls", model=model)
        else:
            words = (self.prefix + said).split(" ")
            for n, word in enumerate(words):
                yield TextDelta(word if n == 0 else " " + word)
            yield Finish("stop", model=model)
        # Usage comes last, as OpenAI-compatible servers send it.
        yield UsageChunk(Usage(input_tokens=len(said.split()), output_tokens=len(said.split())))

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo("echo-1", "Echo", context_length=4096)]

    async def aclose(self) -> None:
        pass  # nothing to close: a real provider closes its HTTP client here


@hookimpl
def nekobot_llm_provider_types() -> list[ProviderType]:
    return [
        ProviderType(
            "echo",
            EchoProvider,
            config_schema={"type": "object", "properties": {"prefix": {"type": "string"}}},
            description="Answers with the prompt",
        )
    ]
