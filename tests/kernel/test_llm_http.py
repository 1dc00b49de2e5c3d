"""Tests of kernel.llm_http: retry policy and Retry-After, HTTP errors mapped to provider
errors (the provider's message, never a key), the SSE parser, and `ProviderHTTP`'s
retries over an in-process transport (a real server is used in the OpenAI plugin's
tests, for cancellation and cut-off streams)."""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
import pytest

from kernel.llm import (
    ContextTooLongError,
    ProviderAuthError,
    ProviderBadRequestError,
    ProviderResponseError,
    ProviderServerError,
    ProviderUnreachableError,
    RateLimitedError,
    UnknownModelError,
)
from kernel.llm_http import (
    DONE,
    ProviderHTTP,
    RetryPolicy,
    SSEEvent,
    error_detail,
    error_for_status,
    parse_retry_after,
    sse_events,
    timeouts,
)

KEY = "sk-test-0123456789abcdef"


def openai_error(
    message: str, code: str | None = None, type: str = "invalid_request_error"
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


# ------------------------------------------------------------------ policy


def test_the_policy_backs_off_with_full_jitter_up_to_its_cap() -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.5, max_delay=3.0)
    assert [policy.delay(n, None, lambda: 1.0) for n in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.delay(3, None, lambda: 0.25) == 0.75
    assert policy.delay(0, 7.0, lambda: 1.0) == 7.0  # Retry-After wins over backoff
    assert RetryPolicy(max_retry_after=5).delay(0, 6.0, lambda: 1.0) is None
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    when = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(when, now=lambda: 1_000_000.0) == 30.0
    assert parse_retry_after(when, now=lambda: 2_000_000.0) == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_timeouts_keep_connect_and_read_apart() -> None:
    t = timeouts(2, 90)
    assert (t.connect, t.read, t.write, t.pool) == (2, 90, 90, 2)


# ------------------------------------------------------------------ errors


def test_error_detail_finds_the_providers_own_message() -> None:
    assert error_detail(b'{"error": {"message": "No  such\\nmodel"}}') == "No such model"
    assert error_detail(b'{"error": "model not loaded"}') == "model not loaded"  # Ollama
    assert error_detail(b'{"detail": [{"msg": "field required"}]}') == "field required"
    assert error_detail(b"upstream timed out") == "upstream timed out"
    assert error_detail(b"<html><body>502 Bad Gateway</body></html>") == ""


def test_statuses_become_the_right_provider_errors() -> None:
    import json

    def err(status: int, body: Any, **kw: Any) -> Any:
        return error_for_status("p", status, json.dumps(body).encode(), **kw)

    auth = err(
        401, openai_error(f"Incorrect API key provided: {KEY}.", "invalid_api_key"), secrets=[KEY]
    )
    assert isinstance(auth, ProviderAuthError)
    assert str(auth) == "LLM provider 'p' refused the API key: Incorrect API key provided: ….", auth
    assert KEY not in str(auth)
    assert isinstance(err(403, openai_error("forbidden")), ProviderAuthError)

    limited = err(429, openai_error("slow down"), headers={"retry-after": "2"})
    assert isinstance(limited, RateLimitedError) and limited.retry_after == 2.0
    assert "retry after 2 s" in str(limited) and "slow down" in str(limited)

    too_long = err(
        400,
        openai_error(
            "This model's maximum context length is 8192 tokens.", "context_length_exceeded"
        ),
    )
    assert isinstance(too_long, ContextTooLongError) and "8192" in str(too_long)
    llama_cpp = {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
        }
    }
    assert isinstance(err(400, llama_cpp), ContextTooLongError)
    assert isinstance(
        err(400, {"error": {"message": "too many tokens in prompt"}}), ContextTooLongError
    )

    unknown = err(
        404, openai_error("The model `gpt-9` does not exist", "model_not_found"), model="gpt-9"
    )
    assert isinstance(unknown, UnknownModelError)
    assert str(unknown).startswith("LLM provider 'p' has no model 'gpt-9': The model")
    wrong_url = error_for_status("p", 404, b"Not Found")
    assert isinstance(wrong_url, ProviderBadRequestError) and "base URL" in str(wrong_url)

    server = err(503, {"error": {"message": "overloaded"}})
    assert isinstance(server, ProviderServerError) and server.status == 503
    assert str(server) == "LLM provider 'p' failed (HTTP 503): overloaded."
    bad = err(400, openai_error("messages: field required"))
    assert isinstance(bad, ProviderBadRequestError) and not bad.retryable


# ------------------------------------------------------------------ SSE


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


@pytest.mark.anyio
async def test_the_sse_parser_follows_the_standard() -> None:
    got = [
        e
        async for e in sse_events(
            lines(
                ": a comment, and a keep-alive",
                "",
                'data: {"a": 1}',
                "",
                "event: delta",
                "id: 7",
                "data:first",
                "data:  second",
                "",
                "\r",
                "retry: 100",
                "data: " + DONE + "\r",
                "",
                "data: cut off before its blank line",
            )
        )
    ]
    assert got == [
        SSEEvent('{"a": 1}'),
        SSEEvent("first\n second", "delta", "7"),
        SSEEvent(DONE, "message", "7"),
    ]
    assert got[0].json() == {"a": 1}
    with pytest.raises(ProviderResponseError, match="a stream event is not JSON"):
        got[1].json("p")


# ------------------------------------------------------------------ ProviderHTTP


Handler = Callable[[httpx.Request], httpx.Response]


POLICY = RetryPolicy(attempts=3, base_delay=1, max_delay=10)


class Script:
    """Answers requests in turn from a list; records what it was sent and slept."""

    def __init__(self, answers: Iterable[httpx.Response | Exception]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.slept: list[float] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def http(self, policy: RetryPolicy = POLICY) -> ProviderHTTP:
        client = httpx.AsyncClient(
            transport=httpx.MockTransport(self.handle), base_url="http://llm.test/v1"
        )
        return ProviderHTTP(
            "p", client, policy, secrets=[KEY], sleep=self.sleep, random=lambda: 0.5
        )


@pytest.mark.anyio
async def test_a_rate_limit_is_retried_after_what_the_provider_asked() -> None:
    script = Script(
        [
            httpx.Response(429, json=openai_error("slow"), headers={"Retry-After": "4"}),
            httpx.Response(200, json={"ok": True}),
        ]
    )
    assert await script.http().request_json("POST", "/chat", json={"x": 1}) == {"ok": True}
    assert script.slept == [4.0]
    assert [r.content for r in script.requests] == [b'{"x":1}'] * 2


@pytest.mark.anyio
async def test_server_errors_are_retried_with_jitter_then_raised() -> None:
    script = Script([httpx.Response(500, text="boom")] * 3)
    with pytest.raises(ProviderServerError, match=r"failed \(HTTP 500\): boom"):
        await script.http().request_json("GET", "/models")
    assert script.slept == [0.5, 1.0]  # random() * base * 2**n
    assert len(script.requests) == 3


@pytest.mark.anyio
async def test_a_long_retry_after_is_not_waited_for() -> None:
    script = Script([httpx.Response(429, headers={"Retry-After": "600"})])
    with pytest.raises(RateLimitedError) as caught:
        await script.http().request_json("GET", "/models")
    assert caught.value.retry_after == 600.0 and script.slept == []


@pytest.mark.anyio
async def test_what_the_request_caused_is_never_retried() -> None:
    script = Script([httpx.Response(400, json=openai_error("bad role"))])
    with pytest.raises(ProviderBadRequestError, match="rejected the request: bad role"):
        await script.http().request_json("POST", "/chat")
    assert len(script.requests) == 1 and script.slept == []

    script = Script(
        [
            httpx.Response(
                200, text="<html>a login page</html>", headers={"content-type": "text/html"}
            )
        ]
    )
    with pytest.raises(ProviderResponseError, match=r"the answer is not JSON \(text/html\)"):
        await script.http().request_json("GET", "/models")
    assert len(script.requests) == 1


@pytest.mark.anyio
async def test_connect_errors_are_retried_then_unreachable() -> None:
    script = Script([httpx.ConnectError("refused")] * 2 + [httpx.ReadTimeout("slow")])
    with pytest.raises(ProviderUnreachableError, match="no answer within the read timeout"):
        await script.http().request_json("GET", "/models")
    assert len(script.requests) == 3
    script = Script([httpx.ConnectError("refused")])
    with pytest.raises(ProviderUnreachableError, match=r"could not connect at http://llm\.test"):
        await script.http(RetryPolicy(attempts=1)).request_json("GET", "/models")


class Cut(httpx.AsyncByteStream):
    """A body that sends some bytes and then loses its connection."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body"
        )


SSE = {"content-type": "text/event-stream"}


@pytest.mark.anyio
async def test_a_stream_is_retried_only_before_it_starts() -> None:
    script = Script(
        [
            httpx.Response(503, json={"error": {"message": "warming up"}}),
            httpx.Response(200, content=b"data: 1\n\ndata: 2\n\n", headers=SSE),
        ]
    )
    http = script.http()
    assert [e.data async for e in http.sse("/chat")] == ["1", "2"]
    assert script.slept == [0.5]

    script = Script([httpx.Response(200, stream=Cut(b"data: 1\n\ndata: 2"), headers=SSE)])
    got: list[str] = []
    with pytest.raises(
        ProviderResponseError, match="the connection closed before the answer ended"
    ):
        async for event in script.http().sse("/chat"):
            got.append(event.data)
    assert got == ["1"] and len(script.requests) == 1

    # An error the caller's own block raises is not a failed request to retry.
    script = Script([httpx.Response(200, content=b"x")])
    with pytest.raises(httpx.ReadError):
        async with script.http().stream("GET", "/x"):
            raise httpx.ReadError("the caller's")
    assert len(script.requests) == 1


@pytest.mark.anyio
async def test_a_stream_that_is_not_sse_is_refused() -> None:
    script = Script([httpx.Response(200, json={"error": {"message": f"nope {KEY}"}})])
    with pytest.raises(ProviderResponseError) as caught:
        [e async for e in script.http().sse("/chat")]
    assert "not an event stream (application/json): nope …" in str(caught.value)
    assert KEY not in str(caught.value)


class Stalls(httpx.AsyncByteStream):
    """A body that sends some bytes and then stops arriving."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise httpx.ReadTimeout("no more bytes")


@pytest.mark.anyio
async def test_a_read_timeout_is_retried_only_before_the_answer_began() -> None:
    script = Script(
        [httpx.ReadTimeout("no headers"), httpx.Response(200, content=b"data: 2\n\n", headers=SSE)]
    )
    assert [e.data async for e in script.http().sse("/chat")] == ["2"]
    assert len(script.requests) == 2

    script = Script([httpx.Response(200, stream=Stalls(), headers=SSE)])
    got: list[str] = []
    with pytest.raises(ProviderUnreachableError, match=r"stopped arriving \(read timeout\)"):
        async for event in script.http().sse("/chat"):
            got.append(event.data)
    assert got == ["1"] and len(script.requests) == 1
