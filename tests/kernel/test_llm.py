"""Tests of kernel.llm: chat types, their serialised form, stream assembly, provider errors
and provider instances opened through the kernel (the docs' echo provider)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from kernel import ProviderType as ExportedProviderType
from kernel.kernel import Kernel
from kernel.llm import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ContentPart,
    ContextTooLongError,
    Finish,
    ImagePart,
    ModelInfo,
    OutputTruncatedError,
    Provider,
    ProviderAuthError,
    ProviderBadRequestError,
    ProviderError,
    ProviderInstance,
    ProviderResponseError,
    ProviderServerError,
    ProviderType,
    ProviderUnreachableError,
    RateLimitedError,
    ReasoningDelta,
    ReasoningPart,
    ResponseAssembler,
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
from kernel.models import ProviderType as ModelsProviderType
from kernel.models import make_converter
from kernel.testing import running_kernel
from kernel.tools import ToolDefinition
from tests.plugin_factory import purge_modules, write_plugin

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "plugins" / "echo_llm"

WEATHER = ToolDefinition(
    "weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def assemble(chunks: Iterable[StreamChunk], source: str = "") -> ChatResponse:
    assembler = ResponseAssembler(source)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.response()


def test_provider_type_is_exported_where_it_always_was() -> None:
    assert ExportedProviderType is ProviderType is ModelsProviderType


# ------------------------------------------------------------------ messages


def test_messages_take_text_or_parts_and_keep_reasoning_apart() -> None:
    assert ChatMessage.user("hi").content == (TextPart("hi"),)
    assert ChatMessage.assistant().content == ()
    image = ImagePart("data:image/png;base64,AAAA", mime="image/png")
    asked = ChatMessage.user([TextPart("what is "), image, TextPart("this?")])
    assert asked.text == "what is this?"
    thought = ReasoningPart("a cat, surely", signature="sig")
    answer = ChatMessage.assistant([thought, TextPart("A cat.")])
    assert (answer.text, answer.reasoning) == ("A cat.", "a cat, surely")
    assert answer.without_reasoning() == ChatMessage.assistant("A cat.")
    assert asked.without_reasoning() is asked


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: ChatMessage("tool", "42"), "needs the tool_call_id"),
        (lambda: ChatMessage("user", "x", (ToolCall("c", "f"),)), "user message cannot carry"),
        (lambda: ChatMessage("robot", "x"), "role must be one of"),  # type: ignore[arg-type]
    ],
)
def test_a_malformed_message_is_refused(build: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


def test_a_tool_result_answers_its_call() -> None:
    call = ToolCall("call_9", "weather", {"city": "Paris"})
    result = ChatMessage.tool_result(call, "rainy")
    assert (result.role, result.tool_call_id, result.name, result.text) == (
        "tool",
        "call_9",
        "weather",
        "rainy",
    )
    assert call.raw_arguments == '{"city":"Paris"}'


@pytest.mark.parametrize(
    ("raw", "arguments", "error"),
    [
        ('{"city": "Paris"}', {"city": "Paris"}, ""),
        ("", {}, ""),
        ('{"city": "Par', {}, "the arguments are not valid JSON (Unterminated string"),
        ("[1, 2]", {}, "the arguments are a JSON list, not an object"),
    ],
)
def test_tool_call_arguments_are_parsed_or_say_why_not(
    raw: str, arguments: dict[str, Any], error: str
) -> None:
    call = ToolCall.parse("c1", "weather", raw)
    assert (call.arguments, call.raw_arguments) == (arguments, raw)
    assert call.error.startswith(error) and bool(call.error) == bool(error)


def test_usage_adds_up() -> None:
    total = Usage(10, 5, reasoning_tokens=2) + Usage(3, 1, cached_tokens=3)
    assert total == Usage(13, 6, 2, 3)
    assert total.total_tokens == 19


# ------------------------------------------------------------------ serialising


def test_chat_types_round_trip_through_the_kernel_converter() -> None:
    conv = make_converter()
    call = ToolCall.parse("c1", "weather", '{"city": "Paris"}', signature="g-sig")
    request = ChatRequest(
        [
            ChatMessage.system("Be a cat."),
            ChatMessage.user([TextPart("and this?"), ImagePart("https://example.invalid/a.png")]),
            ChatMessage.assistant([ReasoningPart("hm", "s-1", source="anthropic")], [call]),
            ChatMessage.tool_result(call, "rainy"),
            ChatMessage.assistant([ReasoningPart(redacted="opaque")]),
        ],
        model="m",
        tools=[WEATHER],
        temperature=0.2,
        max_tokens=100,
        stop=["\n\n"],
        extra={"top_k": 3},
    )
    data = conv.unstructure(request)
    assert data["messages"][1]["content"][1] == {
        "type": "image",
        "url": "https://example.invalid/a.png",
    }
    assert conv.structure(data, ChatRequest) == request
    response = ChatResponse(ChatMessage.assistant("hi"), "length", Usage(1, 2), "m", "r-1")
    assert conv.structure(conv.unstructure(response), ChatResponse) == response
    chunks: list[StreamChunk] = [
        TextDelta("a"),
        ReasoningDelta("b", index=1),
        ToolCallDelta(0, "c", "f", "{"),
        UsageChunk(Usage(1)),
        Finish("stop", "m"),
    ]
    data = conv.unstructure(chunks, list[StreamChunk])
    assert [c["type"] for c in data] == ["text", "reasoning", "tool_call", "usage", "finish"]
    assert conv.structure(data, list[StreamChunk]) == chunks


def test_an_unknown_content_part_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown content part type 'audio'"):
        make_converter().structure({"type": "audio"}, ContentPart)  # type: ignore[arg-type]


# ------------------------------------------------------------------ stream assembly


def test_tool_call_arguments_split_mid_string_are_joined() -> None:
    response = assemble(
        [
            ToolCallDelta(0, id="call_1", name="weather", arguments='{"ci'),
            ToolCallDelta(0, arguments='ty": "Pa'),
            ToolCallDelta(0, arguments="ris, Fr"),
            ToolCallDelta(0, arguments='ance"}'),
            Finish("tool_calls"),
        ]
    )
    (call,) = response.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_1", "weather", {"city": "Paris, France"})
    assert call.error == "" and response.finish_reason == "tool_calls"
    assert response.message.content == ()


def test_parallel_tool_calls_interleaved_are_told_apart_by_index() -> None:
    response = assemble(
        [
            TextDelta("Checking both."),
            ToolCallDelta(1, id="call_b", name="weather", arguments='{"city":'),
            ToolCallDelta(0, id="call_a", name="weather"),
            ToolCallDelta(0, arguments='{"city": "Oslo"}'),
            # Some servers repeat the id and name on every piece.
            ToolCallDelta(1, id="call_b", name="weather", arguments=' "Lima"}'),
            ToolCallDelta(2, name="clock", arguments=""),  # no id, no arguments
            Finish("tool_calls"),
        ]
    )
    assert [(c.id, c.name, dict(c.arguments)) for c in response.tool_calls] == [
        ("call_a", "weather", {"city": "Oslo"}),
        ("call_b", "weather", {"city": "Lima"}),
        ("call_2", "clock", {}),
    ]
    assert response.text == "Checking both."


def test_usage_arriving_in_pieces_and_after_the_finish_is_kept() -> None:
    response = assemble(
        [
            UsageChunk(Usage(input_tokens=12)),  # Anthropic: input with message_start
            TextDelta("Hel"),
            TextDelta("lo"),
            Finish("stop", model="m-1", id="r-9"),
            UsageChunk(Usage(input_tokens=12, output_tokens=2, reasoning_tokens=0)),  # last
        ]
    )
    assert (response.text, response.usage) == ("Hello", Usage(12, 2))
    assert (response.model, response.id, response.finish_reason) == ("m-1", "r-9", "stop")


def test_empty_text_with_finish_length_is_no_answer() -> None:
    response = assemble(
        [ReasoningDelta("Let me think"), ReasoningDelta(" for a long"), Finish("length")]
    )
    assert response.finish_reason == "length"
    assert response.message.content == (ReasoningPart("Let me think for a long"),)
    with pytest.raises(OutputTruncatedError, match="'deepseek' stopped at the output token"):
        response.require_answer("deepseek")
    # Text, even cut short, is an answer.
    cut = assemble([TextDelta("Once upon"), Finish("length")])
    assert cut.require_answer() is cut


def test_reasoning_blocks_stay_apart_from_the_text_with_their_signatures() -> None:
    response = assemble(
        [
            ReasoningDelta("First ", index=0),
            ReasoningDelta("thought.", index=0),
            ReasoningDelta(signature="sig-0", index=0),
            ReasoningDelta(redacted="EnCrYpTeD", index=1),
            TextDelta("Answer."),
            ReasoningDelta("Second thought.", signature="sig-2", index=2),
            Finish("stop"),
        ],
        source="anthropic",
    )
    assert response.message.content == (
        ReasoningPart("First thought.", "sig-0", source="anthropic"),
        ReasoningPart("", redacted="EnCrYpTeD", source="anthropic"),
        ReasoningPart("Second thought.", "sig-2", source="anthropic"),
        TextPart("Answer."),
    )
    assert response.text == "Answer."


def test_a_stream_cut_off_before_its_finish_is_an_error() -> None:
    assembler = ResponseAssembler("openai")
    assembler.feed(TextDelta("Hal"))
    assert not assembler.finished
    with pytest.raises(ProviderResponseError, match="the stream ended before the model finished"):
        assembler.response()


@pytest.mark.anyio
async def test_collect_closes_the_stream_however_it_ends() -> None:
    closed: list[str] = []

    async def stream(fail: bool) -> AsyncIterator[StreamChunk]:
        try:
            yield TextDelta("a")
            if fail:
                raise ProviderUnreachableError("p", "connection reset")
            yield Finish("stop")
        finally:
            closed.append("failed" if fail else "done")

    assert (await collect(stream(False))).text == "a"
    with pytest.raises(ProviderUnreachableError):
        await collect(stream(True))
    assert closed == ["done", "failed"]

    class Endless:
        """A stream that never ends, with an aclose of its own."""

        def __aiter__(self) -> Endless:
            return self

        async def __anext__(self) -> StreamChunk:
            raise ProviderServerError("p", status=502)

        async def aclose(self) -> None:
            closed.append("endless")

    with pytest.raises(ProviderServerError):
        await collect(Endless())
    assert closed[-1] == "endless"


# ------------------------------------------------------------------ errors


def test_provider_errors_are_one_sentence_naming_the_provider() -> None:
    assert str(ProviderAuthError("openai", "Incorrect API key provided.", status=401)) == (
        "LLM provider 'openai' refused the API key: Incorrect API key provided."
    )
    unknown = UnknownModelError("ollama", "llama9")
    assert str(unknown) == "LLM provider 'ollama' has no model 'llama9'."
    limited = RateLimitedError("anthropic", "slow down", retry_after=20)
    assert str(limited) == (
        "LLM provider 'anthropic' is rate limiting requests (retry after 20 s): slow down."
    )
    assert limited.retry_after == 20 and limited.retryable
    failed = ProviderServerError("gemini", status=503)
    assert str(failed) == "LLM provider 'gemini' failed (HTTP 503)."
    assert str(ProviderUnreachableError()) == "The LLM provider could not be reached."
    long = ContextTooLongError("p", "line one\n  line two " + "x" * 1000)
    assert "\n" not in str(long) and len(long.detail) == 500
    assert [
        e.retryable
        for e in (
            ProviderAuthError(),
            ProviderBadRequestError(),
            ContextTooLongError(),
            ProviderServerError(),
            ProviderUnreachableError(),
            RateLimitedError(),
        )
    ] == [False, False, False, True, True, True]
    assert all(
        issubclass(cls, ProviderError)
        for cls in (UnknownModelError, ProviderResponseError, OutputTruncatedError)
    )


# ------------------------------------------------------------------ provider instances


NOT_A_PROVIDER = """
from kernel import ProviderType, hookimpl


class ChatOnly:
    async def chat(self, request):
        return None


@hookimpl
def nekobot_llm_provider_types():
    return [ProviderType("tl_half", lambda ctx, instance: ChatOnly())]
"""


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    plugins = tmp_path / "plugins"
    shutil.copytree(EXAMPLE, plugins / "echo_llm")
    write_plugin(plugins, "tl_half", NOT_A_PROVIDER)
    for name in ("echo_llm", "tl_half"):
        purge_modules(name)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as k:
        yield k


@pytest.mark.anyio
async def test_the_echo_example_chats_streams_and_calls_tools(kernel: Kernel) -> None:
    handle = open_provider(kernel, ProviderInstance("e-1", "echo", {"prefix": "Echo: "}))
    provider = handle.provider
    assert isinstance(provider, Provider)
    assert await provider.models() == [ModelInfo("echo-1", "Echo", context_length=4096)]

    response = await provider.chat(ChatRequest([ChatMessage.user("hello there")]))
    assert (response.text, response.model, response.usage) == (
        "Echo: hello there",
        "echo-1",
        Usage(2, 2),
    )
    deltas = [
        c.text
        async for c in provider.stream(ChatRequest([ChatMessage.user("a b c")]))
        if isinstance(c, TextDelta)
    ]
    assert deltas == ["Echo:", " a", " b", " c"]

    asked = ChatRequest([ChatMessage.user('!weather {"city": "Kyoto"}')], tools=[WEATHER])
    called = await provider.chat(asked)
    assert called.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in called.tool_calls] == [
        ("call_1", "weather", {"city": "Kyoto"})
    ]

    with pytest.raises(ProviderBadRequestError, match="the last message must be the user's"):
        await provider.chat(ChatRequest([ChatMessage.system("alone")]))

    await kernel.plugins.disable("echo_llm")
    assert handle.closed


@pytest.mark.anyio
async def test_open_provider_refuses_an_unknown_type_and_a_non_provider(kernel: Kernel) -> None:
    with pytest.raises(LookupError, match="no LLM provider type 'oracle'"):
        open_provider(kernel, ProviderInstance("o-1", "oracle"))
    with pytest.raises(TypeError, match="factory returned ChatOnly"):
        open_provider(kernel, ProviderInstance("h-1", "tl_half"))


@pytest.mark.anyio
async def test_a_closed_provider_is_closed_once(kernel: Kernel) -> None:
    handle = open_provider(kernel, ProviderInstance("e-2", "echo"))
    closes: list[str] = []

    async def aclose() -> None:
        closes.append("closed")

    handle.provider.aclose = aclose  # type: ignore[method-assign]
    await handle.close()
    await handle.close()
    await kernel.plugins.disable("echo_llm")
    assert closes == ["closed"]
