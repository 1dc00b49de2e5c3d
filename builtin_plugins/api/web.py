"""The API's envelope, error mapping and body validation, shared by every API plugin.

Success is `{"status": "success", "data": ...}`; an error is
`{"status": "error", "message": "...", "code": "..."}` with a real status code. Kernel
errors map to status codes here, in one place.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel.errors import (
    CommandNotFoundError,
    ConfigError,
    ConflictError,
    ContributionError,
    DisposedError,
    EssentialPluginError,
    InstallError,
    ManifestError,
    NekoError,
    PluginExistsError,
    PluginLoadError,
    PluginNotFoundError,
    ReloadError,
    RequestTooLargeError,
)

log = logging.getLogger("nekobot.plugins.api")

#: Scope key of headers that every response must carry, error responses included.
RESPONSE_HEADERS = "nekobot.response_headers"

#: Most specific first.
_STATUS: tuple[tuple[type[NekoError], int], ...] = (
    (PluginNotFoundError, 404),
    (CommandNotFoundError, 404),
    (EssentialPluginError, 403),
    (ReloadError, 422),
    (PluginLoadError, 422),
    (ContributionError, 422),
    (ManifestError, 400),
    (PluginExistsError, 409),
    (InstallError, 400),
    (ConfigError, 400),
    (ConflictError, 409),
    (DisposedError, 503),
    (RequestTooLargeError, 413),
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


class FastJSONResponse(JSONResponse):
    """A JSON response encoded with orjson (an order of magnitude faster than `json` for
    an API page: 25 -> 2 µs for `GET /api/plugins`), or with `json` for what orjson
    refuses (integers beyond 64 bits, keys that are not strings). NaN and infinities,
    which JSON cannot hold, are written as null."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except (orjson.JSONEncodeError, TypeError):
            return super().render(content)


def success(
    data: Any = None, status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The success envelope."""
    return FastJSONResponse(
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
    return FastJSONResponse(body, status_code=status, headers=dict(headers or {}))


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
        cause = exc.__cause__
        if isinstance(cause, ConflictError) and not isinstance(exc, ReloadError):
            # Enabling a plugin whose route or channel another plugin holds: a conflict.
            details["conflict"] = {"kind": cause.kind, "key": cause.key, "holder": cause.holder}
            return failure(409, exc.message, ConflictError.code, details)
        return failure(status_of(exc), exc.message, exc.code, details or None)
    if isinstance(exc, HTTPException):
        # Starlette's own answers (405 with `Allow`, ...) in the envelope.
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        return failure(status, str(exc.detail), code, headers=exc.headers)
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
        # With an app in the scope, Starlette routes raise HTTPException (e.g. 405) instead
        # of answering in plain text, so that those answers get the envelope too.
        scope.setdefault("app", self.app)

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
            response = response_for(exc)
            if isinstance(exc, HTTPException) and exc.status_code == 405:
                allow = _allowed_methods(scope)
                if allow:
                    response.headers["Allow"] = allow
            # Inner middleware (the rate limiter) left headers for every response to carry.
            for name, value in scope.get(RESPONSE_HEADERS, {}).items():
                response.headers[name] = value
            await response(scope, receive, send)


def _allowed_methods(scope: Scope) -> str:
    """Every method some route serves at this path. A 405 from Starlette names only the
    methods of the first route that matched, and each plugin route is a route of its own."""
    kernel = scope.get("nekobot.kernel")
    methods: set[str] = set()
    for route in getattr(getattr(kernel, "asgi_app", None), "routes", ()):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Parse strict JSON; any bad input (also NaN/Infinity, or nesting too deep for the
    parser) is a ValueError, never another exception."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _object(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object (400 naming the body otherwise)."""
    try:
        body = loads(raw) if raw else None
    except ValueError:
        raise ApiError(
            400, "request body is not valid JSON", "invalid_json", {"field": "body"}
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_body", {"field": "body"})
    return body


def is_json_type(content_type: str | None) -> bool:
    """Whether a `Content-Type` is JSON: `application/json` or `application/*+json`,
    with any parameters (`; charset=utf-8`)."""
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _json_body(request: Request) -> bytes:
    """The body of a request that must be JSON if it has one: any other content type is
    a 415. A browser page may send a `text/plain` body to another site without asking;
    `application/json` needs the site's consent (CORS), so only that is parsed."""
    raw = await request.body()
    content_type = request.headers.get("content-type")
    if raw and not is_json_type(content_type):
        given = f"{content_type[:100]!r}" if content_type else "none"
        raise ApiError(
            415,
            f"request body must be JSON with Content-Type application/json (given: {given})",
            "unsupported_media_type",
            {"field": "Content-Type", "expected": "application/json"},
        )
    return raw


async def read_object(request: Request) -> dict[str, Any]:
    """The request's JSON object, unchecked (for bodies the kernel validates itself)."""
    return _object(await _json_body(request))


async def read_json(
    request: Request,
    fields: Mapping[str, type | tuple[type, ...]],
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The request's JSON object, checked: unknown fields and wrong types are a 400."""
    raw = await _json_body(request)
    if not raw:
        if required:
            raise ApiError(
                400,
                f"request body must be a JSON object with {required[0]!r}",
                "invalid_body",
                {"field": required[0]},
            )
        return {}
    body = _object(raw)
    for key, value in body.items():
        expected = fields.get(key)
        if expected is None:
            raise ApiError(400, f"unknown field {key!r}", "unknown_field", {"field": key})
        # bool is an int to isinstance, but `true` is no number to a client.
        if not isinstance(value, expected) or (
            isinstance(value, bool) and bool not in _as_tuple(expected)
        ):
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
    if not request.scope.get("query_string"):
        return  # most requests: no parameters to parse
    for key in request.query_params:
        if key not in allowed:
            raise ApiError(400, f"unknown query parameter {key!r}", "unknown_field", {"field": key})


def query_value(request: Request, name: str, default: str | None = None) -> str | None:
    """A query parameter (the last if repeated), or `default`. (Faster than
    `query_params.get`, which raises and catches a KeyError for each missing name.)"""
    if not request.scope.get("query_string"):
        return default
    params = request.query_params
    return params[name] if name in params else default  # noqa: SIM401 (see above)


def int_param(
    request: Request, name: str, default: int, *, minimum: int = 1, maximum: int | None = None
) -> int:
    """An integer query parameter within bounds (400 naming it otherwise)."""
    raw = query_value(request, name)
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


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def flag(raw: Any, field: str) -> bool:
    """A boolean given as JSON, a query parameter or a form field (`true`/`false`, `1`/`0`,
    `yes`/`no`, `on`/`off`; absent is false); anything else is a 400 naming `field`."""
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    if isinstance(raw, str) and raw.lower() in (*_TRUE, *_FALSE):
        return raw.lower() in _TRUE
    raise ApiError(400, f"{field} must be true or false", "invalid_field", {"field": field})


PAGE_PARAMS = ("page", "page_size", "sort_by", "order")


def paginate(
    request: Request,
    items: list[dict[str, Any]],
    *,
    sort_fields: tuple[str, ...],
    default_sort: str,
    default_order: str = "asc",
    sort_keys: Mapping[str, Callable[[dict[str, Any]], Any]] | None = None,
    sorted_by: str | None = None,
) -> dict[str, Any]:
    """Sort and slice `items` by the `page`, `page_size`, `sort_by`, `order` parameters.

    `sort_keys` gives a field its own ordering (e.g. log levels by severity);
    `sorted_by` names the field `items` come sorted by already (ascending).
    """
    page = int_param(request, "page", 1)
    page_size = int_param(request, "page_size", 20, maximum=100)
    sort_by = query_value(request, "sort_by", default_sort)
    if sort_by not in sort_fields:
        raise ApiError(
            400,
            f"sort_by must be one of {', '.join(sort_fields)}",
            "invalid_field",
            {"field": "sort_by", "allowed": list(sort_fields)},
        )
    order = query_value(request, "order", default_order)
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", "invalid_field", {"field": "order"})
    custom = (sort_keys or {}).get(sort_by)
    if sort_by == sorted_by and order == "asc" and custom is None:
        ordered = items
    else:
        ordered = sorted(
            items,
            key=custom if custom is not None else lambda item: _sort_key(item.get(sort_by)),
            reverse=order == "desc",
        )
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
    """How a secret is shown: its first three and last four characters, and only if it is
    long enough (16+) for that to give little away; a shorter one is just "…"."""
    if len(value) < 16:
        return "…"
    return f"{value[:3]}…{value[-4:]}"


def _is_secret(prop: Any) -> bool:
    return isinstance(prop, Mapping) and bool(
        prop.get("writeOnly") or prop.get("format") == "password" or prop.get("x-secret")
    )


def _items_schema(schema: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    items = schema.get("items") if isinstance(schema, Mapping) else None
    return items if isinstance(items, Mapping) else None


def mask_config(config: Any, schema: Mapping[str, Any] | None) -> Any:
    """`config` with every string the schema marks secret masked, nested objects and
    arrays of objects included."""
    if isinstance(config, list):
        return [mask_config(item, _items_schema(schema)) for item in config]
    if not isinstance(config, Mapping) or not isinstance(schema, Mapping):
        return config
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    out = {}
    for key, value in config.items():
        prop = props.get(key)
        if _is_secret(prop) and isinstance(value, str) and value:
            out[key] = mask_secret(value)
        else:
            out[key] = mask_config(value, prop if isinstance(prop, Mapping) else None)
    return out


def unmask_config(new: Any, stored: Any, schema: Mapping[str, Any] | None) -> Any:
    """`new` where each secret written back in its masked form keeps the stored secret
    (in arrays, an item's stored counterpart is the one at the same index)."""
    if isinstance(new, list):
        olds = stored if isinstance(stored, list) else []
        items = _items_schema(schema)
        return [
            unmask_config(item, olds[i] if i < len(olds) else None, items)
            for i, item in enumerate(new)
        ]
    if not isinstance(new, Mapping) or not isinstance(schema, Mapping):
        return new
    old = stored if isinstance(stored, Mapping) else {}
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    out = {}
    for key, value in new.items():
        prop = props.get(key)
        previous = old.get(key)
        if _is_secret(prop) and isinstance(previous, str) and value == mask_secret(previous):
            out[key] = previous
        else:
            out[key] = unmask_config(value, previous, prop if isinstance(prop, Mapping) else None)
    return out
