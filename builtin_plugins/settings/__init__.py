"""Bot configuration and server settings over the API (partial PUT, validated, live)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.openapi import operation, returns
from builtin_plugins.api.web import ApiError, check_query, loads, success
from kernel import RouteSpec, hookimpl
from kernel.settings import BOT_CONFIG_SCHEMA, RESTART_REQUIRED, SETTINGS_SCHEMA, to_json


async def _object_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = loads(raw) if raw else None
    except ValueError:
        raise ApiError(
            400, "request body is not valid JSON", "invalid_json", {"field": "body"}
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_body", {"field": "body"})
    return body


async def get_bot_config(request: Request) -> JSONResponse:
    """`GET /api/bot/config`."""
    check_query(request, ())
    return success(to_json(request.scope["nekobot.kernel"].bot_config))


async def put_bot_config(request: Request) -> JSONResponse:
    """`PUT /api/bot/config`: merge a partial object, validate, store, apply."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    new = await kernel.update_bot_config(await _object_body(request))
    return success(to_json(new))


async def get_settings(request: Request) -> JSONResponse:
    """`GET /api/settings`."""
    check_query(request, ())
    return success(to_json(request.scope["nekobot.kernel"].settings))


async def put_settings(request: Request) -> JSONResponse:
    """`PUT /api/settings`: merge, validate, store, apply; says which need a restart."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await _object_body(request)
    new = await kernel.update_settings(body)
    data = to_json(new)
    data["restart_required"] = sorted(k for k in body if k in RESTART_REQUIRED)
    return success(data)


def _full(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The whole object of `schema` (plus `extra` properties) as the response."""
    return returns(
        {
            **schema,
            "properties": {**schema["properties"], **extra},
            "required": sorted(schema["properties"]),
        }
    )


def _object(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A partial object of `schema` in, the full object out."""
    return operation(
        {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": dict(schema)}},
            }
        },
        _full(schema, **extra),
    )


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/bot/config",
            get_bot_config,
            methods=("GET",),
            name="get_bot_config",
            summary="Get the bot configuration",
            openapi=_full(BOT_CONFIG_SCHEMA),
        ),
        RouteSpec(
            "/api/bot/config",
            put_bot_config,
            methods=("PUT",),
            name="put_bot_config",
            summary="Update the bot configuration (partial)",
            openapi=_object(BOT_CONFIG_SCHEMA),
        ),
        RouteSpec(
            "/api/settings",
            get_settings,
            methods=("GET",),
            name="get_settings",
            summary="Get the server settings",
            openapi=_full(SETTINGS_SCHEMA),
        ),
        RouteSpec(
            "/api/settings",
            put_settings,
            methods=("PUT",),
            name="put_settings",
            summary="Update the server settings (partial)",
            openapi=_object(
                SETTINGS_SCHEMA, restart_required={"type": "array", "items": {"type": "string"}}
            ),
        ),
    ]
