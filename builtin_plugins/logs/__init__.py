"""Structured log records over the API."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.shapes import record_json
from builtin_plugins.api.web import PAGE_PARAMS, ApiError, check_query, paginate, success
from kernel import RouteSpec, hookimpl

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _since(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        raise ApiError(
            400,
            "since must be epoch seconds or an ISO 8601 time",
            "invalid_field",
            {"field": "since"},
        ) from None


async def list_logs(request: Request) -> JSONResponse:
    """`GET /api/logs?level=&plugin=&since=&q=`: newest first by default."""
    check_query(request, (*PAGE_PARAMS, "level", "plugin", "since", "q"))
    kernel = request.scope["nekobot.kernel"]
    params = request.query_params
    level = params.get("level", "DEBUG").upper()
    if level not in _LEVELS:
        raise ApiError(
            400, f"level must be one of {', '.join(_LEVELS)}", "invalid_field", {"field": "level"}
        )
    minimum = logging.getLevelName(level)
    plugin = params.get("plugin")
    since = _since(params["since"]) if "since" in params else None
    needle = params.get("q", "").casefold()
    items = [
        record_json(r)
        for r in list(kernel.logging.buffer.records)
        if logging.getLevelName(r.level) >= minimum
        and (plugin is None or r.plugin == plugin)
        and (since is None or r.time >= since)
        and (not needle or needle in r.message.casefold())
    ]
    return success(
        paginate(
            request,
            items,
            sort_fields=("time", "seq", "level", "plugin"),
            default_sort="seq",
            default_order="desc",
        )
    )


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/logs",
            list_logs,
            name="list_logs",
            summary="Structured log records, filtered and paginated",
        )
    ]
