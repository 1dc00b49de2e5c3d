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


def check_query(request: Request, allowed: tuple[str, ...]) -> None:
    """400 naming the first query parameter the endpoint does not know."""
    for key in request.query_params:
        if key not in allowed:
            raise ApiError(400, f"unknown query parameter {key!r}", "unknown_field", {"field": key})


def int_param(
    request: Request, name: str, default: int, *, minimum: int = 1, maximum: int | None = None
) -> int:
    """An integer query parameter within bounds (400 naming it otherwise)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, f"query parameter {name!r} must be an integer", "invalid_field", {"field": name}
        ) from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ApiError(
            400, f"query parameter {name!r} must be {bound}", "invalid_field", {"field": name}
        )
    return value


PAGE_PARAMS = ("page", "page_size", "sort_by", "order")


def paginate(
    request: Request,
    items: list[dict[str, Any]],
    *,
    sort_fields: tuple[str, ...],
    default_sort: str,
    default_order: str = "asc",
) -> dict[str, Any]:
    """Sort and slice `items` by the `page`, `page_size`, `sort_by`, `order` parameters."""
    page = int_param(request, "page", 1)
    page_size = int_param(request, "page_size", 20, maximum=100)
    sort_by = request.query_params.get("sort_by", default_sort)
    if sort_by not in sort_fields:
        raise ApiError(
            400,
            f"sort_by must be one of {', '.join(sort_fields)}",
            "invalid_field",
            {"field": "sort_by"},
        )
    order = request.query_params.get("order", default_order)
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", "invalid_field", {"field": "order"})
    ordered = sorted(items, key=lambda item: _sort_key(item.get(sort_by)), reverse=order == "desc")
    start = (page - 1) * page_size
    return {
        "items": ordered[start : start + page_size],
        "total": len(items),
        "page": page,
        "page_size": page_size,
    }


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, 0)
    if isinstance(value, bool | int | float):
        return (1, value)
    return (2, str(value))


def mask_secret(value: str) -> str:
    """How a secret is shown: its first three and last four characters at most."""
    if len(value) <= 8:
        return "…"
    return f"{value[:3]}…{value[-4:]}"


def secret_fields(schema: Mapping[str, Any] | None) -> set[str]:
    """Top-level properties a JSON Schema marks secret (`writeOnly`, `format: password`,
    or `x-secret`)."""
    if not schema:
        return set()
    out = set()
    for key, prop in dict(schema.get("properties", {})).items():
        if isinstance(prop, Mapping) and (
            prop.get("writeOnly") or prop.get("format") == "password" or prop.get("x-secret")
        ):
            out.add(key)
    return out


def masked(config: Mapping[str, Any], secrets_: set[str]) -> dict[str, Any]:
    """`config` with its secret string values masked."""
    return {
        k: mask_secret(v) if k in secrets_ and isinstance(v, str) and v else v
        for k, v in config.items()
    }


def unmasked(
    new: Mapping[str, Any], stored: Mapping[str, Any], secrets_: set[str]
) -> dict[str, Any]:
    """`new` where a secret written back in its masked form keeps the stored secret."""
    out = dict(new)
    for key in secrets_:
        old = stored.get(key)
        if isinstance(old, str) and out.get(key) == mask_secret(old):
            out[key] = old
    return out
