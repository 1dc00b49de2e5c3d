"""Plugin administration over the API; every endpoint calls a kernel operation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.shapes import plugin_json, result_json
from builtin_plugins.api.web import (
    PAGE_PARAMS,
    ApiError,
    check_query,
    masked,
    paginate,
    read_json,
    secret_fields,
    success,
    unmasked,
)
from builtin_plugins.plugin_admin.upload import upload_plugin
from kernel import RouteSpec, hookimpl


async def list_plugins(request: Request) -> JSONResponse:
    """`GET /api/plugins`."""
    check_query(request, (*PAGE_PARAMS, "state", "source"))
    kernel = request.scope["nekobot.kernel"]
    items = [plugin_json(i) for i in kernel.plugins.infos()]
    for field in ("state", "source"):
        wanted = request.query_params.get(field)
        if wanted is not None:
            items = [i for i in items if i[field] == wanted]
    return success(
        paginate(
            request,
            items,
            sort_fields=("name", "state", "source", "version", "loaded_at", "reload_count"),
            default_sort="name",
        )
    )


async def _name(request: Request) -> str:
    body = await read_json(request, {"name": str}, required=("name",))
    name: str = body["name"]
    return name


async def enable(request: Request) -> JSONResponse:
    """`POST /api/plugins/enable {"name"}`."""
    kernel = request.scope["nekobot.kernel"]
    return success(result_json(await kernel.plugins.enable(await _name(request))))


async def disable(request: Request) -> JSONResponse:
    """`POST /api/plugins/disable {"name"}` (403 for essential plugins)."""
    kernel = request.scope["nekobot.kernel"]
    return success(result_json(await kernel.plugins.disable(await _name(request))))


async def reload(request: Request) -> JSONResponse:
    """`POST /api/plugins/reload {"name"}` (422 if it fails; the old generation serves)."""
    kernel = request.scope["nekobot.kernel"]
    return success(result_json(await kernel.plugins.reload(await _name(request))))


def _flag(raw: Any, field: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
        return raw.lower() in ("true", "1", "yes")
    raise ApiError(400, f"{field} must be true or false", "invalid_field", {"field": field})


async def delete(request: Request) -> JSONResponse:
    """`DELETE /api/plugins/delete?name=` (or JSON body); `keep_data` keeps its storage."""
    check_query(request, ("name", "keep_data"))
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(request, {"name": str, "keep_data": bool})
    name = request.query_params.get("name") or body.get("name")
    if not name:
        raise ApiError(400, "field 'name' is required", "missing_field", {"field": "name"})
    keep = _flag(request.query_params.get("keep_data", body.get("keep_data", False)), "keep_data")
    result = await kernel.plugins.delete(name, keep_data=keep)
    return success({**result_json(result), "deleted": True, "data_kept": keep})


async def get_config(request: Request) -> JSONResponse:
    """`GET /api/plugins/config?name=`: `{config, schema}` with secrets masked."""
    check_query(request, ("name",))
    name = request.query_params.get("name")
    if not name:
        raise ApiError(
            400, "query parameter 'name' is required", "missing_field", {"field": "name"}
        )
    kernel = request.scope["nekobot.kernel"]
    schema = kernel.plugins.config_schema(name)
    config = await kernel.plugins.get_config(name)
    return success(
        {"name": name, "config": masked(config, secret_fields(schema)), "schema": schema}
    )


async def put_config(request: Request) -> JSONResponse:
    """`PUT /api/plugins/config {"name","config"}`: validated against the schema, live."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(request, {"name": str, "config": dict}, required=("name", "config"))
    name = body["name"]
    schema = kernel.plugins.config_schema(name)
    secrets_ = secret_fields(schema)
    stored = await kernel.storage.state_get("plugin_config", name, {})
    config = unmasked(body["config"], stored, secrets_)
    full = await kernel.plugins.set_config(name, config)
    return success({"name": name, "config": masked(full, secrets_), "schema": schema})


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec("/api/plugins", list_plugins, name="list_plugins", summary="Every plugin"),
        RouteSpec(
            "/api/plugins/enable",
            enable,
            methods=("POST",),
            name="enable_plugin",
            summary="Enable a plugin",
        ),
        RouteSpec(
            "/api/plugins/disable",
            disable,
            methods=("POST",),
            name="disable_plugin",
            summary="Disable a plugin",
        ),
        RouteSpec(
            "/api/plugins/reload",
            reload,
            methods=("POST",),
            name="reload_plugin",
            summary="Reload a plugin transactionally",
        ),
        RouteSpec(
            "/api/plugins/upload",
            upload_plugin,
            methods=("POST",),
            name="upload_plugin",
            summary="Upload a plugin as a zip",
        ),
        RouteSpec(
            "/api/plugins/delete",
            delete,
            methods=("DELETE",),
            name="delete_plugin",
            summary="Delete a user plugin",
        ),
        RouteSpec(
            "/api/plugins/config",
            get_config,
            methods=("GET",),
            name="get_plugin_config",
            summary="A plugin's configuration and schema",
        ),
        RouteSpec(
            "/api/plugins/config",
            put_config,
            methods=("PUT",),
            name="put_plugin_config",
            summary="Change a plugin's configuration",
        ),
    ]
