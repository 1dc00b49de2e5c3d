"""The openai_compatible provider type against a genuine model server: llama.cpp's
OpenAI-compatible server with SmolLM2-135M (see tests/llama_server.py). A model this
small says odd things: these tests assert on the plumbing, never on the wording."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from kernel import Kernel
from kernel.llm import (
    ChatMessage,
    ChatRequest,
    Finish,
    ProviderInstance,
    TextDelta,
    UsageChunk,
    collect,
    open_provider,
)
from kernel.testing import running_kernel
from kernel.tools import ToolDefinition

pytestmark = pytest.mark.anyio


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    async with running_kernel(tmp_path / "data", builtin_plugins=["llm_openai"]) as k:
        yield k


def instance(base_url: str) -> ProviderInstance:
    config = {"base_url": base_url, "model": "smollm2", "api_key": "sk-local"}
    return ProviderInstance("llama", "openai_compatible", config)


def hello(max_tokens: int = 12) -> ChatRequest:
    return ChatRequest((ChatMessage.user("Say hello."),), max_tokens=max_tokens)


async def test_a_plain_reply_with_its_tokens_counted(kernel: Kernel, llama_base_url: str) -> None:
    handle = open_provider(kernel, instance(llama_base_url))
    response = await handle.provider.chat(hello())
    assert response.message.text.strip()
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.finish_reason in ("stop", "length")
    await handle.close()


async def test_a_streamed_reply_arrives_complete(kernel: Kernel, llama_base_url: str) -> None:
    handle = open_provider(kernel, instance(llama_base_url))
    chunks = [c async for c in handle.provider.stream(hello())]
    texts = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert len(texts) > 1 and "".join(texts).strip()
    assert isinstance(chunks[-1], Finish) or any(isinstance(c, Finish) for c in chunks)
    assert sum(isinstance(c, UsageChunk) for c in chunks) <= 1
    response = await collect(handle.provider.stream(hello()))
    assert response.message.text.strip()
    await handle.close()


async def test_a_tool_is_offered_to_the_model(kernel: Kernel, llama_base_url: str) -> None:
    handle = open_provider(kernel, instance(llama_base_url))
    weather = ToolDefinition(
        "get_weather",
        "The weather in a city",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    request = ChatRequest(
        (ChatMessage.user("What is the weather in Paris?"),), tools=(weather,), max_tokens=24
    )
    response = await handle.provider.chat(request)
    # Whether this model calls it is its business; the request was taken and answered.
    assert response.message.text.strip() or response.message.tool_calls
    for call in response.message.tool_calls:
        assert call.name == "get_weather"
    await handle.close()


async def test_a_caller_that_goes_away_ends_the_stream(kernel: Kernel, llama_base_url: str) -> None:
    handle = open_provider(kernel, instance(llama_base_url))
    got_first = anyio.Event()

    async def consume() -> None:
        async for chunk in handle.provider.stream(hello(max_tokens=200)):
            if isinstance(chunk, TextDelta):
                got_first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await got_first.wait()
        tg.cancel_scope.cancel()
    # The server is free again at once: a new request is answered.
    assert (await handle.provider.chat(hello(4))).usage.output_tokens > 0
    await handle.close()
