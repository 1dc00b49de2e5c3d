"""Structured log records over the API."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.openapi import operation, page_of, page_params, param, query, ref, returns
from builtin_plugins.api.shapes import record_json
from builtin_plugins.api.web import PAGE_PARAMS, ApiError, check_query, paginate, success
from kernel import RouteSpec, hookimpl
from kernel.logs import read_log_file

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SORT_FIELDS = ("time", "seq", "level", "plugin")


def _severity(level: str) -> int:
    """The numeric level of a level name; custom levels show as `Level 25`."""
    number = logging.getLevelName(level)
    if isinstance(number, int):
        return number
    _, _, tail = level.partition(" ")
    return int(tail) if tail.isdigit() else logging.NOTSET


def _since(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except (ValueError, OverflowError):  # also dates the platform cannot convert
        raise ApiError(
            400,
            "since must be epoch seconds or an ISO 8601 time",
            "invalid_field",
            {"field": "since"},
        ) from None


async def list_logs(request: Request) -> JSONResponse:
    """`GET /api/logs?level=&plugin=&since=&q=`: newest first by default."""
    check_query(request, (*PAGE_PARAMS, "level", "plugin", "since", "q", "source"))
    kernel = request.scope["nekobot.kernel"]
    params = request.query_params
    level = params.get("level", "DEBUG").upper()
    if level not in _LEVELS:
        raise ApiError(
            400, f"level must be one of {', '.join(_LEVELS)}", "invalid_field", {"field": "level"}
        )
    minimum = _severity(level)
    plugin = params.get("plugin")
    since = _since(params["since"]) if "since" in params else None
    needle = params.get("q", "").casefold()
    source = params.get("source", "memory")
    if source == "memory":
        records = list(kernel.logging.buffer.records)
    elif source == "file":
        records = await anyio.to_thread.run_sync(read_log_file, kernel.logging.file)
    else:
        raise ApiError(
            400, "source must be 'memory' or 'file'", "invalid_field", {"field": "source"}
        )
    items = [
        record_json(r)
        for r in records
        if _severity(r.level) >= minimum
        and (plugin is None or r.plugin == plugin)
        and (since is None or r.time >= since)
        and (not needle or needle in r.message.casefold())
    ]
    return success(
        paginate(
            request,
            items,
            sort_fields=_SORT_FIELDS,
            default_sort="seq",
            default_order="desc",
            sort_keys={"level": lambda item: _severity(item["level"])},
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
            openapi=operation(
                {"parameters": page_params(_SORT_FIELDS, "seq", "desc")},
                query(
                    param(
                        "level",
                        {"enum": [*_LEVELS, *(lv.lower() for lv in _LEVELS)]},
                        description="minimum level",
                    ),
                    param("plugin", {"type": "string"}),
                    param(
                        "since",
                        {"type": "string"},
                        description="epoch seconds or an ISO 8601 time",
                    ),
                    param("q", {"type": "string"}, description="text the message contains"),
                    param(
                        "source",
                        {"enum": ["memory", "file"]},
                        description="the in-memory ring buffer (default) or the log file",
                    ),
                ),
                returns(page_of(ref("LogRecord"))),
            ),
        )
    ]
