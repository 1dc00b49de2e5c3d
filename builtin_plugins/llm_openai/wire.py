"""The OpenAI chat-completions wire format, both ways: kernel chat types to request
bodies, response bodies and stream chunks back to kernel types."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from kernel.llm import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ContentPart,
    Finish,
    FinishReason,
    ImagePart,
    ModelInfo,
    ProviderResponseError,
    ReasoningDelta,
    ReasoningPart,
    StreamChunk,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageChunk,
)

#: The provider type's name, recorded as the `source` of the reasoning it returns.
SOURCE = "openai_compatible"

Reasoning = Literal["send_back", "drop"]

_FINISH: Mapping[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated single-function form
    "content_filter": "content_filter",
}


def finish_reason(value: Any) -> FinishReason:
    """The kernel's finish reason for a wire one (`other` for what it does not know)."""
    return _FINISH.get(str(value), "other")


# ------------------------------------------------------------------ requests


def _image(part: ImagePart) -> dict[str, Any]:
    image: dict[str, Any] = {"url": part.url}
    if part.detail != "auto":
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def _user_content(parts: tuple[ContentPart, ...]) -> str | list[dict[str, Any]]:
    """Plain text as a string (what every server takes); parts once there is an image."""
    if not any(isinstance(p, ImagePart) for p in parts):
        return "".join(p.text for p in parts if isinstance(p, TextPart))
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            out.append(_image(part))
    return out


def _reasoning_to_send(message: ChatMessage) -> str:
    # Another provider type's reasoning is its own affair (signed, or in a form this
    # protocol has no field for): only this protocol's, or unattributed text, goes back.
    return "".join(
        p.text
        for p in message.content
        if isinstance(p, ReasoningPart) and p.source in ("", SOURCE) and p.text
    )


def message_to_wire(message: ChatMessage, reasoning: Reasoning) -> dict[str, Any]:
    """One message as the chat-completions API takes it."""
    out: dict[str, Any] = {"role": message.role}
    if message.role == "user":
        out["content"] = _user_content(message.content)
    elif message.role == "assistant":
        # A message that only calls tools has `content: null`, as OpenAI writes it.
        out["content"] = message.text or (None if message.tool_calls else "")
        if message.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.raw_arguments},
                }
                for call in message.tool_calls
            ]
        thought = _reasoning_to_send(message) if reasoning == "send_back" else ""
        if thought:
            out["reasoning_content"] = thought
    else:
        out["content"] = message.text
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
    elif message.name:
        out["name"] = message.name
    return out


def request_to_wire(
    request: ChatRequest, model: str, reasoning: Reasoning, *, stream: bool
) -> dict[str, Any]:
    """The body of `POST /chat/completions` for `request`."""
    body: dict[str, Any] = {
        "model": request.model or model,
        "messages": [message_to_wire(m, reasoning) for m in request.messages],
    }
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": dict(tool.parameters),
                },
            }
            for tool in request.tools
        ]
        body["tool_choice"] = request.tool_choice
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    if stream:
        body["stream"] = True
        if request.stream_usage:
            body["stream_options"] = {"include_usage": True}
    body.update(request.extra)
    return body


# ------------------------------------------------------------------ responses


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_from_wire(value: Any) -> Usage | None:
    """The usage block of a response or chunk (None if there is none)."""
    if not isinstance(value, Mapping):
        return None
    completion = value.get("completion_tokens_details")
    prompt = value.get("prompt_tokens_details")
    return Usage(
        _int(value.get("prompt_tokens")),
        _int(value.get("completion_tokens")),
        _int(completion.get("reasoning_tokens")) if isinstance(completion, Mapping) else 0,
        _int(prompt.get("cached_tokens")) if isinstance(prompt, Mapping) else 0,
    )


def _reasoning_of(value: Mapping[str, Any]) -> str:
    # DeepSeek and vLLM say `reasoning_content`; OpenRouter and newer vLLM `reasoning`.
    for key in ("reasoning_content", "reasoning"):
        text = value.get(key)
        if isinstance(text, str) and text:
            return text
    return ""


def _first_choice(body: Any, provider: str) -> Mapping[str, Any]:
    choices = body.get("choices") if isinstance(body, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise ProviderResponseError(provider, "the answer has no choices")
    return choices[0]


def response_from_wire(body: Any, provider: str) -> ChatResponse:
    """A whole (not streamed) chat-completions answer."""
    choice = _first_choice(body, provider)
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise ProviderResponseError(provider, "the answer's choice has no message")
    content: list[ContentPart] = []
    thought = _reasoning_of(message)
    if thought:
        content.append(ReasoningPart(thought, source=SOURCE))
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append(TextPart(text))
    calls = []
    for n, raw in enumerate(message.get("tool_calls") or ()):
        function = raw.get("function") if isinstance(raw, Mapping) else None
        if not isinstance(function, Mapping):
            raise ProviderResponseError(provider, "a tool call has no function")
        arguments = function.get("arguments")
        calls.append(
            ToolCall.parse(
                str(raw.get("id") or f"call_{n}"),
                str(function.get("name") or ""),
                arguments if isinstance(arguments, str) else "",
            )
        )
    return ChatResponse(
        ChatMessage("assistant", content, calls),
        finish_reason(choice.get("finish_reason")),
        usage_from_wire(body.get("usage")) or Usage(),
        model=str(body.get("model") or ""),
        id=str(body.get("id") or ""),
    )


def chunks_from_wire(body: Any, provider: str) -> Iterator[StreamChunk]:
    """The kernel chunks one streamed `chat.completion.chunk` amounts to. The usage of
    a stream comes in a last chunk whose `choices` is empty."""
    if not isinstance(body, Mapping):
        raise ProviderResponseError(provider, "a stream chunk is not a JSON object")
    if isinstance(body.get("error"), Mapping):  # some servers report failures mid-stream
        message = body["error"].get("message")
        raise ProviderResponseError(provider, f"the stream failed: {message}")
    choices = body.get("choices") or []
    if not isinstance(choices, list):
        raise ProviderResponseError(provider, "a stream chunk's choices are not a list")
    for choice in choices[:1]:  # n=1: one answer
        delta = choice.get("delta") if isinstance(choice, Mapping) else None
        if isinstance(delta, Mapping):
            thought = _reasoning_of(delta)
            if thought:
                yield ReasoningDelta(thought)
            text = delta.get("content")
            if isinstance(text, str) and text:
                yield TextDelta(text)
            for n, call in enumerate(delta.get("tool_calls") or ()):
                if not isinstance(call, Mapping):
                    continue
                function = call.get("function")
                function = function if isinstance(function, Mapping) else {}
                index = call.get("index")
                yield ToolCallDelta(
                    index if isinstance(index, int) else n,
                    id=str(call.get("id") or ""),
                    name=str(function.get("name") or ""),
                    arguments=str(function.get("arguments") or ""),
                )
        reason = choice.get("finish_reason") if isinstance(choice, Mapping) else None
        if reason:
            yield Finish(
                finish_reason(reason),
                model=str(body.get("model") or ""),
                id=str(body.get("id") or ""),
            )
    usage = usage_from_wire(body.get("usage"))
    if usage is not None:
        yield UsageChunk(usage)


def models_from_wire(body: Any, provider: str) -> list[ModelInfo]:
    """The answer of `GET /models`."""
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise ProviderResponseError(provider, "the model list has no data")
    models = []
    for item in data:
        if isinstance(item, Mapping) and isinstance(item.get("id"), str):
            # OpenRouter says `context_length`, vLLM `max_model_len`.
            limit = item.get("context_length", item.get("max_model_len"))
            models.append(
                ModelInfo(
                    item["id"],
                    str(item.get("name") or item["id"]),
                    context_length=limit if isinstance(limit, int) else None,
                )
            )
    return models
