"""Per-client API rate limiting with `X-RateLimit-*` headers on every API response."""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from builtin_plugins.api.web import RESPONSE_HEADERS, failure
from kernel.asgi import route_path

_WINDOW = 60.0
_LIMITED_PREFIXES = ("/api", "/chat")


class RateLimiter:
    """Fixed one-minute windows per client; the limit is read live from the settings."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._window = 0.0

    def hit(self, key: str, limit: int, now: float | None = None) -> tuple[bool, int, int]:
        """Count one request; (allowed, remaining, reset as epoch seconds)."""
        now = time.time() if now is None else now
        window = math.floor(now / _WINDOW) * _WINDOW
        if window != self._window:
            self._window, self._counts = window, {}
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        reset = int(window + _WINDOW)
        return count <= limit, max(0, limit - count), reset


class RateLimitMiddleware:
    """Adds the rate-limit headers to API responses and answers 429 past the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kernel: Any = scope.get("nekobot.kernel")
        limiter = kernel.services.current(RateLimiter) if kernel is not None else None
        if (
            scope["type"] != "http"
            or not isinstance(limiter, RateLimiter)
            or not route_path(scope).startswith(_LIMITED_PREFIXES)
            # A request re-routed while its plugin was swapped was counted already.
            or scope.get("nekobot.redispatch")
        ):
            await self.app(scope, receive, send)
            return
        limit = kernel.settings.rate_limit_per_minute
        client = scope.get("client")
        allowed, remaining, reset = limiter.hit(client[0] if client else "unknown", limit)
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        }
        # For the error middleware (outside us) when a route raises.
        scope.setdefault(RESPONSE_HEADERS, {}).update(headers)
        if not allowed:
            retry = max(1, reset - int(time.time()))
            await failure(
                429,
                f"rate limit of {limit} requests per minute exceeded; retry in {retry} s",
                "rate_limited",
                headers={**headers, "Retry-After": str(retry)},
            )(scope, receive, send)
            return

        raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        ours = {name for name, _ in raw}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Appended as raw pairs (MutableHeaders rescans the list for each one);
                # the route's own X-RateLimit-* would be replaced, as before.
                kept = [(n, v) for n, v in message.get("headers", ()) if n.lower() not in ours]
                message["headers"] = kept + raw
            await send(message)

        await self.app(scope, receive, send_with_headers)
