"""A scripted fake of the OpenAI chat-completions wire protocol, as a starlette app to
serve on loopback: each request to `/v1/chat/completions` or `/v1/models` takes the next
scripted answer (plain JSON, an error, an SSE stream, a stream cut off, one that never
ends) and is recorded with its headers and body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import attrs
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send


def completion(
    content: str | None = "Hello!",
    *,
    finish: str = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str | None = None,
    usage: tuple[int, int] = (9, 3),
    model: str = "fake-model",
) -> dict[str, Any]:
    """A `chat.completion` body as OpenAI writes it."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        },
    }


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    usage: tuple[int, int] | None = None,
    model: str = "fake-model",
) -> dict[str, Any]:
    """A `chat.completion.chunk`; without a delta, the usage chunk (`choices: []`)."""
    body: dict[str, Any] = {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    return body


def sse(events: Iterable[dict[str, Any] | str], *, done: bool = True) -> list[bytes]:
    """The SSE frames of `events` (dicts as JSON, strings as they are; one starting
    with `:` is a comment line), then `[DONE]`."""
    frames = [
        (e if e.startswith(":") else f"data: {e}").encode() + b"\n\n"
        if isinstance(e, str)
        else f"data: {json.dumps(e)}\n\n".encode()
        for e in events
    ]
    return frames + ([b"data: [DONE]\n\n"] if done else [])


@attrs.frozen
class Stream:
    """Answer with an SSE stream of `frames`. `cut`: close the connection after them,
    before the response is complete. `hang`: then wait until the client goes away."""

    frames: list[bytes]
    cut: bool = False
    hang: bool = False


@attrs.frozen
class Received:
    """A request the fake answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


Answer = Response | Stream


class FakeOpenAI:
    """The fake: `script(...)` the answers, serve `app`, read `requests`."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.requests: list[Received] = []
        self.hanging = anyio.Event()  # a hanging stream sent its frames
        self.disconnected = anyio.Event()  # and then saw its client go away
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._endpoint, methods=["POST"]),
                Route("/v1/models", self._endpoint, methods=["GET"]),
            ]
        )

    def script(self, *answers: Answer) -> None:
        """Queue answers for the next requests, in order."""
        self.answers.extend(answers)

    async def _endpoint(self, request: Request) -> Response:
        raw = await request.body()
        self.requests.append(
            Received(
                request.method,
                request.url.path,
                dict(request.headers),
                json.loads(raw) if raw else None,
            )
        )
        if not self.answers:
            return PlainTextResponse("the fake has no answer scripted", 599)
        answer = self.answers.pop(0)
        if isinstance(answer, Response):
            return answer
        if answer.cut:
            return _CutStream(answer.frames)  # type: ignore[return-value]
        return StreamingResponse(self._frames(answer), media_type="text/event-stream")

    async def _frames(self, stream: Stream) -> AsyncIterator[bytes]:
        for frame in stream.frames:
            yield frame
        if stream.hang:
            self.hanging.set()
            try:
                await anyio.sleep_forever()
            finally:
                # Starlette cancels the body when the client disconnects.
                self.disconnected.set()


class _CutStream:
    """An ASGI response that sends its frames and stops without finishing the body:
    uvicorn then closes the connection mid-answer, as a crashed server would."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for frame in self.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})


def error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An OpenAI-style error answer."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status, headers=headers)
