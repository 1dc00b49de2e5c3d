"""HTTP machinery every LLM provider type shares, whatever its wire protocol.

A provider plugin builds one `ProviderHTTP` per provider instance around its own
`httpx.AsyncClient` (timeouts from `timeouts(connect, read)`) and sends through it:
`request_json` for a plain answer, `sse` for a Server-Sent-Events stream (`stream` for
any other streamed body). Both retry what may succeed later (429, 5xx, a connection
that failed, a read that timed out before any byte of the answer) with jittered
exponential backoff that honours `Retry-After`, and turn every failure into the
`ProviderError` that says what went wrong, with the provider's own message and never
a key. A stream is read inside `async with client.stream(...)`, so when the caller's
task is cancelled or the caller stops reading, the HTTP response is closed: the
provider sees the request go away.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random as _random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import attrs
import httpx

from kernel.llm_errors import (
    ContextTooLongError,
    ProviderAuthError,
    ProviderBadRequestError,
    ProviderError,
    ProviderResponseError,
    ProviderServerError,
    ProviderUnreachableError,
    RateLimitedError,
    UnknownModelError,
)

__all__ = [
    "DONE",
    "ProviderHTTP",
    "RetryPolicy",
    "SSEEvent",
    "error_detail",
    "error_for_status",
    "error_for_transport",
    "parse_retry_after",
    "redact",
    "sse_events",
    "timeouts",
]

log = logging.getLogger("nekobot.llm")

#: The data of the last event of an OpenAI-style stream.
DONE = "[DONE]"


def timeouts(connect: float, read: float) -> httpx.Timeout:
    """Connect and read timeouts in seconds, kept apart: a model may think for a minute
    before its first token, a server that is down should fail in seconds. `read` bounds
    each wait for bytes (and the write of the request), not the whole answer."""
    return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)


# ------------------------------------------------------------------ retries


@attrs.frozen
class RetryPolicy:
    """How often and how long to retry a request that may succeed later: `attempts` in
    all (1 means no retry), waits of `random() * min(max_delay, base_delay * 2**n)`
    ("full jitter") unless the provider said `Retry-After`, which is honoured up to
    `max_retry_after` seconds; a provider that asks for longer gets no retry (the error
    goes to the caller with its `retry_after`, to try a fallback instead)."""

    attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    base_delay: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=20.0, validator=attrs.validators.ge(0))
    max_retry_after: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))

    def delay(
        self, retry: int, retry_after: float | None, random: Callable[[], float]
    ) -> float | None:
        """Seconds to wait before retry number `retry` (0 for the first), or None when
        the provider asked for a longer wait than allowed."""
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return float(random() * min(self.max_delay, self.base_delay * 2**retry))


def retryable(error: ProviderError) -> bool:
    """Whether a failed request is worth sending again as it is: rate limits, server
    errors and an unreachable server; never what the request itself caused, nor an
    answer that could not be read (a wrong URL answers the same way each time)."""
    return isinstance(error, RateLimitedError | ProviderServerError | ProviderUnreachableError)


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds a `Retry-After` header asks for (a number of seconds or an HTTP date),
    None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now()
    return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable


# ------------------------------------------------------------------ errors


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (of 4+ characters) replaced by `…`."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "…")
    return text


def _message_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for key in ("message", "msg", "detail", "error", "error_description"):
            if key in value:
                found = _message_of(value[key])
                if found:
                    return found
    if isinstance(value, list) and value:
        return _message_of(value[0])
    return ""


def _code_of(value: Any) -> str:
    if not isinstance(value, Mapping):
        return ""
    error = value.get("error")
    for holder in (error, value):
        if isinstance(holder, Mapping):
            for key in ("code", "type", "status"):
                if isinstance(holder.get(key), str):
                    return str(holder[key])
    return ""


def error_detail(body: bytes | str) -> str:
    """The provider's own message in an error body: `error.message` (OpenAI, Anthropic,
    Gemini), `error` as a string (Ollama, llama.cpp), `message` or `detail`; else the
    start of the body itself, if it is text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    found = _message_of(parsed) if parsed is not None else ""
    if not found and not text.lstrip().startswith("<"):  # an HTML error page says nothing
        found = text
    return " ".join(found.split())[:300]


_CONTEXT_CODES = (
    "context_length_exceeded",
    "context_too_long",
    "exceed_context_size_error",  # llama.cpp
    "string_above_max_length",
)
_CONTEXT_WORDS = (
    "context length",
    "context_length",
    "context window",
    "context size",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "exceeds the context",
    "input is too long",
)


def error_for_status(
    provider: str,
    status: int,
    body: bytes | str = b"",
    headers: Mapping[str, str] | None = None,
    *,
    model: str = "",
    secrets: Iterable[str] = (),
    now: Callable[[], float] = time.time,
) -> ProviderError:
    """The `ProviderError` an HTTP error answer amounts to, with the provider's message
    (secrets redacted): 401/403 auth, 404 or a `model_not_found` code about a model an
    unknown model, 429 rate limited (with `Retry-After`), 400/413/422 about the context
    length too long a context, other 4xx a bad request, 5xx a server error."""
    headers = headers or {}
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    detail = redact(error_detail(text), secrets)
    try:
        code = _code_of(json.loads(text)).lower()
    except ValueError:
        code = ""
    lowered = detail.lower()
    retry_after = parse_retry_after(headers.get("retry-after"), now)
    if status in (401, 403):
        return ProviderAuthError(provider, detail, status=status)
    if status == 429:
        return RateLimitedError(provider, detail, retry_after=retry_after, status=status)
    if status >= 500:
        return ProviderServerError(provider, detail, status=status)
    if code in _CONTEXT_CODES or any(w in lowered for w in _CONTEXT_WORDS) or status == 413:
        return ContextTooLongError(provider, detail, status=status)
    if code == "model_not_found" or (status == 404 and "model" in lowered):
        return UnknownModelError(provider, model, detail, status=status)
    if status == 404:
        return ProviderBadRequestError(
            provider, f"HTTP 404, is the base URL right? {detail}", status=status
        )
    if status == 408:
        return ProviderUnreachableError(provider, f"HTTP 408 {detail}", status=status)
    if 400 <= status < 500:
        return ProviderBadRequestError(provider, detail or f"HTTP {status}", status=status)
    return ProviderResponseError(provider, f"unexpected HTTP {status} {detail}", status=status)


def error_for_transport(
    provider: str, exc: httpx.HTTPError, *, started: bool = False
) -> ProviderError:
    """The `ProviderError` a failure of the connection amounts to. `started`: the answer
    had begun to arrive (then a closed connection means an answer cut off)."""
    request = getattr(exc, "_request", None)
    where = f" at {request.url.scheme}://{request.url.netloc.decode()}" if request else ""
    if isinstance(exc, httpx.ConnectTimeout):
        return ProviderUnreachableError(provider, f"connecting{where} timed out")
    if isinstance(exc, httpx.ConnectError):
        return ProviderUnreachableError(provider, f"could not connect{where}")
    if isinstance(exc, httpx.TimeoutException):
        if started:
            return ProviderUnreachableError(provider, "the answer stopped arriving (read timeout)")
        return ProviderUnreachableError(provider, "no answer within the read timeout")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        if started:
            return ProviderResponseError(provider, "the connection closed before the answer ended")
        return ProviderUnreachableError(provider, f"the connection closed without an answer{where}")
    return ProviderUnreachableError(provider, type(exc).__name__)


# ------------------------------------------------------------------ server-sent events


@attrs.frozen
class SSEEvent:
    """One Server-Sent Event: its `event` name (`message` unless named), its `data`
    (the `data:` lines joined by newlines) and its `id`."""

    data: str
    event: str = "message"
    id: str = ""

    def json(self, provider: str = "") -> Any:
        """`data` parsed as JSON; `ProviderResponseError` if it is not."""
        try:
            return json.loads(self.data)
        except ValueError:
            raise ProviderResponseError(
                provider, f"a stream event is not JSON: {self.data[:80]!r}"
            ) from None


async def sse_events(lines: AsyncIterable[str]) -> AsyncIterator[SSEEvent]:
    """The events of an SSE body given line by line (`response.aiter_lines()`), as the
    HTML standard parses them: a blank line ends an event, `:` starts a comment, one
    space after a field's colon is dropped, several `data:` lines join with newlines.
    An event without data is skipped, and so is one left unfinished when the body
    ends (a stream cut off)."""
    data: list[str] = []
    event = ""
    last_id = ""
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield SSEEvent("\n".join(data), event or "message", last_id)
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\0" not in value:
            last_id = value


# ------------------------------------------------------------------ the client


class ProviderHTTP:
    """Sends one provider instance's requests with its retry policy and maps failures to
    `ProviderError`s named after `provider`. `secrets` (its API keys) are redacted from
    every message. `sleep`, `random` and `clock` are injectable for tests."""

    def __init__(
        self,
        provider: str,
        client: httpx.AsyncClient,
        policy: RetryPolicy = RetryPolicy(),
        *,
        secrets: Iterable[str] = (),
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.client = client
        self.policy = policy
        self.secrets = tuple(s for s in secrets if s)
        self.sleep = sleep
        self.random = random
        self.clock = clock

    def status_error(self, response: httpx.Response, body: bytes, model: str = "") -> ProviderError:
        """The error an HTTP error answer amounts to."""
        return error_for_status(
            self.provider,
            response.status_code,
            body,
            response.headers,
            model=model,
            secrets=self.secrets,
            now=self.clock,
        )

    async def _backoff(self, retry: int, error: ProviderError) -> bool:
        """Wait before retry number `retry`; False when no retry is due."""
        if not retryable(error) or retry + 1 >= self.policy.attempts:
            return False
        delay = self.policy.delay(retry, getattr(error, "retry_after", None), self.random)
        if delay is None:
            return False
        log.info("%s; retrying in %.2f s (attempt %d)", error, delay, retry + 2)
        await self.sleep(delay)
        return True

    async def request_json(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        model: str = "",
    ) -> Any:
        """Send a request and return its JSON answer, retrying per the policy.
        `model` names the model in an unknown-model error."""
        retry = 0
        while True:
            try:
                response = await self.client.request(method, url, json=json, headers=headers)
            except httpx.HTTPError as exc:
                error = error_for_transport(self.provider, exc)
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError:
                        kind = response.headers.get("content-type", "no content type")
                        raise ProviderResponseError(
                            self.provider,
                            f"the answer is not JSON ({kind}): "
                            + redact(error_detail(response.content), self.secrets)[:80],
                            status=response.status_code,
                        ) from None
                error = self.status_error(response, response.content, model)
            if not await self._backoff(retry, error):
                raise error
            retry += 1

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        model: str = "",
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and give its successful response, unread, retrying per the
        policy until then (never once the body is being read). The response is closed
        when the block ends, however it ends (cancellation included)."""
        retry = 0
        while True:
            async with AsyncExitStack() as stack:
                try:
                    response = await stack.enter_async_context(
                        self.client.stream(method, url, json=json, headers=headers)
                    )
                    body = b"" if response.is_success else await response.aread()
                except httpx.HTTPError as exc:
                    error = error_for_transport(self.provider, exc)
                else:
                    if response.is_success:
                        # Outside the `try`: what the caller's block raises is its own.
                        yield response
                        return
                    error = self.status_error(response, body, model)
            if not await self._backoff(retry, error):
                raise error
            retry += 1

    async def sse(
        self,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        model: str = "",
    ) -> AsyncGenerator[SSEEvent, None]:
        """POST a request and yield the events of its SSE answer; a failure while it
        streams is a `ProviderError` (a connection closed midway: the answer was cut
        off). Closing the iterator, or cancelling the task reading it, closes the
        request."""
        async with self.stream("POST", url, json=json, headers=headers, model=model) as response:
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                body = await response.aread()
                raise ProviderResponseError(
                    self.provider,
                    f"the answer is not an event stream ({kind or 'no content type'}): "
                    + redact(error_detail(body), self.secrets)[:80],
                )
            try:
                async for event in sse_events(response.aiter_lines()):
                    yield event
            except httpx.HTTPError as exc:
                raise error_for_transport(self.provider, exc, started=True) from None
