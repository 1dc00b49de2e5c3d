"""The `openai_compatible` LLM provider type: the OpenAI chat-completions protocol
(OpenAI, DeepSeek, Moonshot, SiliconFlow, OpenRouter, vLLM, LM Studio, llama.cpp) on
httpx, through the kernel's shared provider HTTP machinery (`kernel.llm_http`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import httpx

from builtin_plugins.llm_openai.wire import (
    SOURCE,
    Reasoning,
    chunks_from_wire,
    models_from_wire,
    request_to_wire,
    response_from_wire,
)
from kernel import PluginContext, hookimpl
from kernel.llm import (
    ChatRequest,
    ChatResponse,
    ModelInfo,
    ProviderInstance,
    ProviderResponseError,
    ProviderType,
    StreamChunk,
)
from kernel.llm_http import DONE, ProviderHTTP, RetryPolicy, timeouts
from kernel.plugin_config import validate_config

#: The configuration of an instance. `api_key` is write-only: the admin API masks it.
CONFIG_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["base_url", "model"],
    "properties": {
        "base_url": {
            "type": "string",
            "pattern": r"^https?://[^\s/]+(/[^\s]*)?/v1/?$",
            "description": "The API's root, ending in /v1 (as OpenAI's clients expect)",
        },
        "api_key": {
            "type": "string",
            "writeOnly": True,
            "default": "",
            "description": "Sent as a bearer token; empty sends none (local servers)",
        },
        "model": {"type": "string", "minLength": 1, "description": "The default model"},
        "connect_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 10},
        "read_timeout": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 120,
            "description": "Seconds to wait for each piece of the answer",
        },
        "max_retries": {"type": "integer", "minimum": 0, "maximum": 10, "default": 2},
        "extra_headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "default": {},
        },
        "reasoning": {
            "enum": ["send_back", "drop"],
            "default": "drop",
            "description": "send_back: the history's reasoning goes back as "
            "reasoning_content (DeepSeek's thinking mode needs it); drop: it is left out",
        },
    },
}


class OpenAICompatibleProvider:
    """One `openai_compatible` instance, with its own HTTP client (closed by `aclose`)."""

    def __init__(self, ctx: PluginContext, instance: ProviderInstance) -> None:
        config = validate_config(CONFIG_SCHEMA, instance.config)
        self.name = instance.name or instance.id
        self.base_url = str(config["base_url"]).rstrip("/")
        self.model = str(config["model"])
        self.reasoning: Reasoning = config["reasoning"]
        api_key = str(config["api_key"])
        headers = {str(k): str(v) for k, v in dict(config["extra_headers"]).items()}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.AsyncClient(
            timeout=timeouts(float(config["connect_timeout"]), float(config["read_timeout"])),
            headers=headers,
            follow_redirects=False,
        )
        self.http = ProviderHTTP(
            self.name,
            self.client,
            RetryPolicy(attempts=int(config["max_retries"]) + 1),
            secrets=[api_key],
        )

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """The whole answer to `request`."""
        body = request_to_wire(request, self.model, self.reasoning, stream=False)
        answer = await self.http.request_json(
            "POST", f"{self.base_url}/chat/completions", json=body, model=body["model"]
        )
        return response_from_wire(answer, self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        """The answer to `request` as it comes; a stream that ends before the model
        finished is a `ProviderResponseError`, never a silently shorter answer."""
        body = request_to_wire(request, self.model, self.reasoning, stream=True)
        finished = False
        events = self.http.sse(f"{self.base_url}/chat/completions", json=body, model=body["model"])
        try:
            async for event in events:
                if event.data == DONE:
                    break
                for chunk in chunks_from_wire(event.json(self.name), self.name):
                    finished = finished or chunk.type == "finish"
                    yield chunk
        finally:
            await events.aclose()  # closes the HTTP response at once, however this ends
        if not finished:
            raise ProviderResponseError(self.name, "the stream ended before the model finished")

    async def models(self) -> list[ModelInfo]:
        """`GET /models`."""
        return models_from_wire(
            await self.http.request_json("GET", f"{self.base_url}/models"), self.name
        )

    async def aclose(self) -> None:
        """Close the HTTP client; idempotent."""
        await self.client.aclose()


@hookimpl
def nekobot_llm_provider_types() -> Iterable[ProviderType]:
    """The `openai_compatible` type."""
    return [
        ProviderType(
            SOURCE,
            OpenAICompatibleProvider,
            config_schema=CONFIG_SCHEMA,
            description="OpenAI-compatible chat completions (OpenAI, DeepSeek, vLLM, llama.cpp…)",
        )
    ]
