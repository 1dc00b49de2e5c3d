"""CORS for the origins the `cors_origins` setting allows (read live, per request).

Tokens travel in the Authorization header, never in cookies, so credentials are not
allowed and a preflight never needs authentication.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from builtin_plugins.api.web import RESPONSE_HEADERS

_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
_EXPOSE = "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"


class CORSMiddleware:
    """Answers preflights and marks responses for allowed origins; others get no headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kernel = scope.get("nekobot.kernel")
        if scope["type"] != "http" or kernel is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if not origin or origin not in kernel.settings.cors_origins:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            requested = headers.get("access-control-request-headers", "")
            allowed = ", ".join(
                h.strip()
                for h in requested.split(",")
                if h.strip().lower() in ("authorization", "content-type")
            )
            await Response(
                status_code=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": _METHODS,
                    "Access-Control-Allow-Headers": allowed or "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )(scope, receive, send)
            return

        cors = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": _EXPOSE}
        # For the error middleware (outside us) when a route raises: a dashboard must be
        # able to read why a request failed.
        scope.setdefault(RESPONSE_HEADERS, {}).update({**cors, "Vary": "Origin"})

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out.update(cors)
                out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)
