"""Bot configuration and server settings over the API (partial PUT, validated, live)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.openapi import operation, returns
from builtin_plugins.api.web import check_query, read_object, success
from kernel import RouteSpec, hookimpl
from kernel.settings import BOT_CONFIG_SCHEMA, RESTART_REQUIRED, SETTINGS_SCHEMA, to_json


async def get_bot_config(request: Request) -> JSONResponse:
    """`GET /api/bot/config`."""
    check_query(request, ())
    return success(to_json(request.scope["nekobot.kernel"].bot_config))


async def put_bot_config(request: Request) -> JSONResponse:
    """`PUT /api/bot/config`: merge a partial object, validate, store, apply."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    new = await kernel.update_bot_config(await read_object(request))
    return success(to_json(new))


async def get_settings(request: Request) -> JSONResponse:
    """`GET /api/settings`."""
    check_query(request, ())
    return success(to_json(request.scope["nekobot.kernel"].settings))


async def put_settings(request: Request) -> JSONResponse:
    """`PUT /api/settings`: merge, validate, store, apply; says which need a restart."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await read_object(request)
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


def _get_and_put(
    path: str, name: str, what: str, schema: dict[str, Any], get: Any, put: Any, **extra: Any
) -> list[RouteSpec]:
    """`GET` the whole object at `path`, `PUT` a partial one."""
    return [
        RouteSpec(
            path,
            get,
            methods=("GET",),
            name=f"get_{name}",
            summary=f"Get the {what}",
            openapi=_full(schema),
        ),
        RouteSpec(
            path,
            put,
            methods=("PUT",),
            name=f"put_{name}",
            summary=f"Update the {what} (partial)",
            openapi=_object(schema, **extra),
        ),
    ]


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        *_get_and_put(
            "/api/bot/config",
            "bot_config",
            "bot configuration",
            BOT_CONFIG_SCHEMA,
            get_bot_config,
            put_bot_config,
        ),
        *_get_and_put(
            "/api/settings",
            "settings",
            "server settings",
            SETTINGS_SCHEMA,
            get_settings,
            put_settings,
            restart_required={"type": "array", "items": {"type": "string"}},
        ),
    ]
