"""The `openai_compatible` provider type, opened through a kernel that runs the builtin
and sent to a scripted fake of the OpenAI wire protocol on loopback: the request bodies
it sends, the answers it reads (plain, streamed, tool calls, reasoning, usage), the
errors it raises, its retries, and the HTTP request closed when its caller goes away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from starlette.responses import JSONResponse, PlainTextResponse

from kernel import ConfigError
from kernel.kernel import Kernel
from kernel.llm import (
    ChatMessage,
    ChatRequest,
    ContextTooLongError,
    Finish,
    ImagePart,
    ModelInfo,
    OutputTruncatedError,
    ProviderAuthError,
    ProviderHandle,
    ProviderInstance,
    ProviderResponseError,
    ProviderUnreachableError,
    RateLimitedError,
    ReasoningDelta,
    ReasoningPart,
    StreamChunk,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    UnknownModelError,
    Usage,
    UsageChunk,
    collect,
    open_provider,
)
from kernel.testing import PATIENCE, free_port, running_kernel, serving
from kernel.tools import ToolDefinition
from tests.builtin_plugins.llm_openai.fake_openai import (
    FakeOpenAI,
    Stream,
    chunk,
    completion,
    error,
    sse,
)

KEY = "sk-fake-0123456789abcdefXYZ"
WEATHER = ToolDefinition(
    "weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@attrs.define
class Setup:
    kernel: Kernel
    fake: FakeOpenAI
    base_url: str
    slept: list[float]

    def open(self, **config: Any) -> ProviderHandle:
        """An `openai_compatible` instance against the fake; its retry waits recorded."""
        full = {"base_url": self.base_url, "model": "fake-model", "api_key": KEY, **config}
        handle = open_provider(self.kernel, ProviderInstance("oa", "openai_compatible", full))

        async def sleep(seconds: float) -> None:
            self.slept.append(seconds)

        handle.provider.http.sleep = sleep  # type: ignore[attr-defined]
        return handle


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    fake = FakeOpenAI()
    async with (
        serving(fake.app) as port,
        running_kernel(tmp_path / "data", builtin_plugins=["llm_openai"]) as kernel,
    ):
        yield Setup(kernel, fake, f"http://127.0.0.1:{port}/v1", [])


@pytest.mark.anyio
async def test_chat_maps_the_conversation_both_ways(setup: Setup) -> None:
    call = ToolCall("call_7", "weather", {"city": "Kyoto"})
    setup.fake.script(
        JSONResponse(
            completion(
                None,
                finish="tool_calls",
                reasoning="They want Osaka too.",
                tool_calls=[
                    {
                        "id": "call_8",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Osaka"}'},
                    }
                ],
            )
        )
    )
    provider = setup.open(extra_headers={"X-Title": "NekoBot"}).provider
    request = ChatRequest(
        [
            ChatMessage.system("Be brief."),
            ChatMessage.user([TextPart("What is this?"), ImagePart("data:image/png;base64,AA==")]),
            ChatMessage.assistant(
                [ReasoningPart("Look it up.", source="openai_compatible"), TextPart("Checking.")],
                [call],
            ),
            ChatMessage.tool_result(call, "sunny"),
        ],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0.2,
        max_tokens=64,
    )
    response = await provider.chat(request)

    sent = setup.fake.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["x-title"] == "NekoBot"
    assert sent.body == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_7",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Kyoto"}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "call_7"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "The weather in a city",
                    "parameters": dict(WEATHER.parameters),
                },
            }
        ],
        "tool_choice": "required",
        "temperature": 0.2,
        "max_tokens": 64,
    }
    assert response.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in response.tool_calls] == [
        ("call_8", "weather", {"city": "Osaka"})
    ]
    assert response.message.reasoning == "They want Osaka too."
    assert response.text == ""
    assert (response.usage, response.model, response.id) == (
        Usage(9, 3),
        "fake-model",
        "chatcmpl-1",
    )


@pytest.mark.anyio
async def test_reasoning_goes_back_only_when_the_config_says_send_back(setup: Setup) -> None:
    history = ChatRequest(
        [
            ChatMessage.user("2+2?"),
            ChatMessage.assistant(
                [ReasoningPart("Add them.", source="openai_compatible"), TextPart("4")]
            ),
            ChatMessage.assistant([ReasoningPart("sealed", signature="sig", source="anthropic")]),
            ChatMessage.user("And 3+3?"),
        ],
        model="deepseek-reasoner",
    )
    setup.fake.script(JSONResponse(completion("6")), JSONResponse(completion("6")))
    sending = setup.open(reasoning="send_back").provider
    assert (await sending.chat(history)).text == "6"
    dropping = setup.open().provider  # drop is the default
    await dropping.chat(history)
    sent, dropped = (r.body["messages"] for r in setup.fake.requests)
    assert setup.fake.requests[0].body["model"] == "deepseek-reasoner"
    assert sent[1] == {"role": "assistant", "content": "4", "reasoning_content": "Add them."}
    # Another provider type's signed reasoning is never sent to this one.
    assert sent[2] == {"role": "assistant", "content": ""}
    assert dropped[1] == {"role": "assistant", "content": "4"}


@pytest.mark.anyio
async def test_a_stream_assembles_split_tool_calls_reasoning_and_final_usage(setup: Setup) -> None:
    setup.fake.script(
        Stream(
            sse(
                [
                    chunk({"role": "assistant", "content": ""}),
                    chunk({"reasoning_content": "Two cities"}),
                    chunk({"reasoning_content": ", two calls."}),
                    chunk({"content": "Let me check."}),
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_a",
                                    "type": "function",
                                    "function": {"name": "weather", "arguments": '{"ci'},
                                }
                            ]
                        }
                    ),
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Ky'}}]}),
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": 1,
                                    "id": "call_b",
                                    "function": {"name": "weather", "arguments": ""},
                                }
                            ]
                        }
                    ),
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'oto"}'}}]}),
                    chunk(
                        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city":"Nara"}'}}]}
                    ),
                    chunk({}, "tool_calls"),
                    ": a keep-alive comment is not an event",
                    chunk(usage=(20, 11)),
                ]
            )
        )
    )
    provider = setup.open().provider
    chunks: list[StreamChunk] = []
    async for c in provider.stream(
        ChatRequest([ChatMessage.user("Kyoto and Nara?")], tools=[WEATHER])
    ):
        chunks.append(c)

    body = setup.fake.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert chunks[:3] == [
        ReasoningDelta("Two cities"),
        ReasoningDelta(", two calls."),
        TextDelta("Let me check."),
    ]
    assert chunks[3] == ToolCallDelta(0, id="call_a", name="weather", arguments='{"ci')
    assert chunks[-2:] == [
        Finish("tool_calls", model="fake-model", id="chatcmpl-2"),
        UsageChunk(Usage(20, 11, reasoning_tokens=2)),
    ]

    setup.fake.script(
        Stream(sse([chunk({"content": "Hi"}), chunk({}, "stop"), chunk(usage=(5, 1))]))
    )
    plain = await collect(provider.stream(ChatRequest([ChatMessage.user("hi")])))
    assert (plain.text, plain.usage) == ("Hi", Usage(5, 1, 2))

    from kernel.llm import ResponseAssembler

    assembler = ResponseAssembler("openai_compatible")
    for c in chunks:
        assembler.feed(c)
    response = assembler.response()
    assert [(c.id, c.arguments) for c in response.tool_calls] == [
        ("call_a", {"city": "Kyoto"}),
        ("call_b", {"city": "Nara"}),
    ]
    assert response.message.reasoning == "Two cities, two calls."
    assert response.text == "Let me check."
    assert response.usage == Usage(20, 11, 2)


@pytest.mark.anyio
async def test_a_bad_key_is_one_sentence_without_the_key(setup: Setup) -> None:
    setup.fake.script(error(401, f"Incorrect API key provided: {KEY}.", "invalid_api_key"))
    with pytest.raises(ProviderAuthError) as caught:
        await setup.open().provider.chat(ChatRequest([ChatMessage.user("hi")]))
    assert str(caught.value) == (
        "LLM provider 'oa' refused the API key: Incorrect API key provided: …."
    )
    assert len(setup.fake.requests) == 1  # never retried


@pytest.mark.anyio
async def test_a_rate_limit_is_waited_out_then_raised_with_retry_after(setup: Setup) -> None:
    setup.fake.script(
        error(429, "Rate limit reached", headers={"Retry-After": "3"}),
        JSONResponse(completion("after the wait")),
    )
    provider = setup.open().provider
    assert (await provider.chat(ChatRequest([ChatMessage.user("hi")]))).text == "after the wait"
    assert setup.slept == [3.0]

    setup.fake.script(*[error(429, "Rate limit reached", headers={"Retry-After": "2"})] * 3)
    with pytest.raises(RateLimitedError, match=r"retry after 2 s\): Rate limit reached") as caught:
        await provider.chat(ChatRequest([ChatMessage.user("hi")]))
    assert caught.value.retry_after == 2.0
    assert len(setup.fake.requests) == 2 + 3  # max_retries 2: three attempts


@pytest.mark.anyio
async def test_a_server_error_is_retried_and_the_stream_then_succeeds(setup: Setup) -> None:
    setup.fake.script(
        error(500, "The server had an error"),
        Stream(sse([chunk({"content": "ok"}), chunk({}, "stop")])),
    )
    response = await collect(setup.open().provider.stream(ChatRequest([ChatMessage.user("hi")])))
    assert response.text == "ok" and len(setup.fake.requests) == 2
    assert len(setup.slept) == 1 and 0 <= setup.slept[0] <= 0.5


@pytest.mark.anyio
async def test_a_stream_cut_off_midway_is_an_error_not_a_shorter_answer(setup: Setup) -> None:
    setup.fake.script(Stream(sse([chunk({"content": "The answer is"})], done=False), cut=True))
    got: list[StreamChunk] = []
    with pytest.raises(ProviderResponseError, match="closed before the answer ended"):
        async for c in setup.open().provider.stream(ChatRequest([ChatMessage.user("hi")])):
            got.append(c)
    assert got == [TextDelta("The answer is")]
    assert len(setup.fake.requests) == 1  # the answer had begun: no retry

    # A stream that ends cleanly but never said the model finished is cut off too.
    setup.fake.script(Stream(sse([chunk({"content": "The answer is"})])))
    with pytest.raises(ProviderResponseError, match="ended before the model finished"):
        await collect(setup.open().provider.stream(ChatRequest([ChatMessage.user("hi")])))


@pytest.mark.anyio
async def test_a_body_that_is_not_json_is_unreadable(setup: Setup) -> None:
    setup.fake.script(PlainTextResponse("<html>Welcome to nginx!</html>", 200))
    with pytest.raises(ProviderResponseError, match=r"the answer is not JSON \(text/plain"):
        await setup.open().provider.chat(ChatRequest([ChatMessage.user("hi")]))
    setup.fake.script(Stream(sse(["not json at all"])))
    with pytest.raises(ProviderResponseError, match="a stream event is not JSON"):
        await collect(setup.open().provider.stream(ChatRequest([ChatMessage.user("hi")])))


@pytest.mark.anyio
async def test_unknown_model_and_context_too_long(setup: Setup) -> None:
    setup.fake.script(
        error(
            404,
            "The model `gpt-9` does not exist or you do not have access to it.",
            "model_not_found",
        ),
        error(
            400,
            "This model's maximum context length is 4096 tokens. "
            "However, you requested 9000 tokens.",
            "context_length_exceeded",
        ),
    )
    provider = setup.open().provider
    with pytest.raises(UnknownModelError, match="has no model 'gpt-9': The model `gpt-9`"):
        await provider.chat(ChatRequest([ChatMessage.user("hi")], model="gpt-9"))
    with pytest.raises(ContextTooLongError, match="maximum context length is 4096"):
        await provider.chat(ChatRequest([ChatMessage.user("hi " * 9000)]))
    assert len(setup.fake.requests) == 2


@pytest.mark.anyio
async def test_models_are_listed(setup: Setup) -> None:
    setup.fake.script(
        JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": "gpt-4o-mini", "object": "model", "owned_by": "openai"},
                    {"id": "qwen", "object": "model", "max_model_len": 32768},
                ],
            }
        )
    )
    assert await setup.open().provider.models() == [
        ModelInfo("gpt-4o-mini", "gpt-4o-mini"),
        ModelInfo("qwen", "qwen", context_length=32768),
    ]
    assert (setup.fake.requests[0].method, setup.fake.requests[0].path) == ("GET", "/v1/models")


@pytest.mark.anyio
async def test_a_server_that_is_not_there_is_unreachable(setup: Setup) -> None:
    setup.base_url = f"http://127.0.0.1:{free_port()}/v1"
    provider = setup.open(max_retries=1).provider
    with pytest.raises(ProviderUnreachableError, match=r"could not connect at http://127\.0\.0\.1"):
        await provider.chat(ChatRequest([ChatMessage.user("hi")]))
    assert len(setup.slept) == 1  # retried once


@pytest.mark.anyio
async def test_a_cancelled_caller_closes_the_request(setup: Setup) -> None:
    setup.fake.script(Stream(sse([chunk({"content": "Thinking"})], done=False), hang=True))
    provider = setup.open().provider
    got: list[StreamChunk] = []
    received = anyio.Event()

    async def read() -> None:
        async for c in provider.stream(ChatRequest([ChatMessage.user("hi")])):
            got.append(c)
            received.set()

    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await received.wait()
            await setup.fake.hanging.wait()
            tg.cancel_scope.cancel()
        await setup.fake.disconnected.wait()
    assert got == [TextDelta("Thinking")]


@pytest.mark.anyio
async def test_a_caller_that_stops_reading_closes_the_request(setup: Setup) -> None:
    setup.fake.script(Stream(sse([chunk({"content": "Thinking"})], done=False), hang=True))
    stream = setup.open().provider.stream(ChatRequest([ChatMessage.user("hi")]))
    with anyio.fail_after(PATIENCE):
        assert await anext(stream) == TextDelta("Thinking")
        await setup.fake.hanging.wait()
        await stream.aclose()  # type: ignore[attr-defined]
        await setup.fake.disconnected.wait()


@pytest.mark.anyio
async def test_the_config_is_validated_and_the_key_is_write_only(setup: Setup) -> None:
    with pytest.raises(ConfigError, match="base_url"):
        setup.open(base_url="http://127.0.0.1:8080")  # no /v1
    with pytest.raises(ConfigError, match="reasoning"):
        setup.open(reasoning="keep")
    with pytest.raises(ConfigError, match="read_timeout"):
        setup.open(read_timeout=0)
    schema = setup.kernel.provider_types.get("openai_compatible").item.config_schema
    assert schema["properties"]["api_key"]["writeOnly"] is True
    setup.open(base_url=setup.base_url + "/")  # a trailing slash is fine


@pytest.mark.anyio
async def test_the_provider_closes_with_its_plugin(setup: Setup) -> None:
    handle = setup.open()
    client = handle.provider.client  # type: ignore[attr-defined]
    await setup.kernel.plugins.disable("llm_openai")
    assert handle.closed and client.is_closed


@pytest.mark.anyio
async def test_an_error_midway_and_an_answer_cut_by_length_are_reported(setup: Setup) -> None:
    setup.fake.script(
        Stream(sse([chunk({"content": "So"}), {"error": {"message": "worker crashed"}}])),
        JSONResponse(completion(None, finish="length")),
        JSONResponse({"id": "x", "choices": []}),
    )
    provider = setup.open().provider
    with pytest.raises(ProviderResponseError, match="the stream failed: worker crashed"):
        await collect(provider.stream(ChatRequest([ChatMessage.user("hi")])))
    cut = await provider.chat(ChatRequest([ChatMessage.user("hi")], max_tokens=1))
    assert (cut.finish_reason, cut.text) == ("length", "")
    with pytest.raises(OutputTruncatedError):
        cut.require_answer("oa")
    with pytest.raises(ProviderResponseError, match="the answer has no choices"):
        await provider.chat(ChatRequest([ChatMessage.user("hi")]))
