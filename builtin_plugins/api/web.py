"""The API's envelope, error mapping and body validation, shared by every API plugin.

Success is `{"status": "success", "data": ...}`; an error is
`{"status": "error", "message": "...", "code": "..."}` with a real status code. Kernel
errors map to status codes here, in one place.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel.errors import (
    ConfigError,
    ConflictError,
    ContributionError,
    DisposedError,
    EssentialPluginError,
    InstallError,
    ManifestError,
    NekoError,
    PluginLoadError,
    PluginNotFoundError,
    ReloadError,
)

log = logging.getLogger("nekobot.plugins.api")

#: Most specific first.
_STATUS: tuple[tuple[type[NekoError], int], ...] = (
    (PluginNotFoundError, 404),
    (EssentialPluginError, 403),
    (ReloadError, 422),
    (PluginLoadError, 422),
    (ContributionError, 422),
    (ManifestError, 400),
    (InstallError, 400),
    (ConfigError, 400),
    (ConflictError, 409),
    (DisposedError, 503),
    (NekoError, 400),
)


class ApiError(Exception):
    """An error the API answers with `status` and the error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.details = details
        self.headers = headers


def success(
    data: Any = None, status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The success envelope."""
    return JSONResponse(
        {"status": "success", "data": data}, status_code=status, headers=dict(headers or {})
    )


def failure(
    status: int,
    message: str,
    code: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error envelope."""
    body: dict[str, Any] = {"status": "error", "message": message, "code": code}
    if details:
        body["details"] = dict(details)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def status_of(exc: NekoError) -> int:
    """The HTTP status of a kernel error."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 400


def response_for(exc: BaseException) -> Response:
    """Map an exception to an error response; an unexpected one is a logged 500."""
    if isinstance(exc, ApiError):
        return failure(exc.status, exc.message, exc.code, exc.details, exc.headers)
    if isinstance(exc, NekoError):
        details: dict[str, Any] = {}
        field = getattr(exc, "field", None)
        if field:
            details["field"] = field
        return failure(status_of(exc), exc.message, exc.code, details or None)
    request_id = secrets.token_hex(6)
    log.error(
        "internal error (request %s): %s: %s", request_id, type(exc).__name__, exc, exc_info=exc
    )
    return failure(
        500,
        f"internal error (request id {request_id})",
        "internal_error",
        {"request_id": request_id},
    )


class ErrorMiddleware:
    """Turns every exception escaping a route into the error envelope: never a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # type: ignore[assignment]
            if started:
                log.error("error after the response started: %s", exc, exc_info=exc)
                return
            await response_for(exc)(scope, receive, send)


async def read_json(
    request: Request,
    fields: Mapping[str, type | tuple[type, ...]],
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The request's JSON object, checked: unknown fields and wrong types are a 400."""
    raw = await request.body()
    if not raw:
        if required:
            raise ApiError(
                400,
                f"request body must be a JSON object with {required[0]!r}",
                "invalid_body",
                {"field": required[0]},
            )
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_body")
    for key, value in body.items():
        expected = fields.get(key)
        if expected is None:
            raise ApiError(400, f"unknown field {key!r}", "unknown_field", {"field": key})
        if isinstance(value, bool) and bool not in _as_tuple(expected):
            raise ApiError(
                400, f"field {key!r} has the wrong type", "invalid_field", {"field": key}
            )
        if not isinstance(value, expected):
            raise ApiError(
                400, f"field {key!r} has the wrong type", "invalid_field", {"field": key}
            )
    for key in required:
        if key not in body:
            raise ApiError(400, f"field {key!r} is required", "missing_field", {"field": key})
    return body


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)
