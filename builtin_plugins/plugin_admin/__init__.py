"""Plugin administration over the API; every endpoint calls a kernel operation."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.openapi import (
    STR,
    STR_LIST,
    json_body,
    obj,
    operation,
    page_of,
    page_params,
    param,
    query,
    ref,
    returns,
)
from builtin_plugins.api.shapes import plugin_json, result_json
from builtin_plugins.api.web import (
    PAGE_PARAMS,
    ApiError,
    check_query,
    flag,
    mask_config,
    paginate,
    query_value,
    read_json,
    success,
    unmask_config,
)
from builtin_plugins.plugin_admin.upload import UPLOAD_OPENAPI, upload_body_limit, upload_plugin
from kernel import PluginContext, RouteSpec, hookimpl
from kernel.models import PluginInfo

OWN_NAME = "plugin_admin"
log = logging.getLogger("nekobot.plugins.plugin_admin")


async def list_plugins(request: Request) -> JSONResponse:
    """`GET /api/plugins`."""
    check_query(request, (*PAGE_PARAMS, "state", "source"))
    kernel = request.scope["nekobot.kernel"]
    items = [_as_json(i) for i in kernel.plugins.infos()]
    for field, allowed in (("state", _STATES), ("source", _SOURCES)):
        wanted = query_value(request, field)
        if wanted is not None:
            if wanted not in allowed:
                raise ApiError(
                    400,
                    f"{field} must be one of {', '.join(allowed)}",
                    "invalid_field",
                    {"field": field},
                )
            items = [i for i in items if i[field] == wanted]
    # The manager lists plugins by name already.
    page = paginate(request, items, sort_fields=_SORT_FIELDS, default_sort="name", sorted_by="name")
    return success(page)


#: `plugin_json` of the `PluginInfo` snapshots served last, by identity: the manager
#: hands out the same snapshot objects until a plugin changes.
_JSON_OF: dict[int, tuple[PluginInfo, dict[str, Any]]] = {}


def _as_json(info: PluginInfo) -> dict[str, Any]:
    hit = _JSON_OF.get(id(info))
    if hit is not None and hit[0] is info:
        return hit[1]
    if len(_JSON_OF) > 512:  # snapshots of plugins long changed
        _JSON_OF.clear()
    shaped = plugin_json(info)
    _JSON_OF[id(info)] = (info, shaped)
    return shaped


_SORT_FIELDS = ("name", "state", "source", "version", "loaded_at", "reload_count")
_STATES = ("active", "disabled", "failed", "pending", "loading", "unloading", "disposed")
_SOURCES = ("builtin", "entrypoint", "user")


async def _name(request: Request) -> str:
    check_query(request, ())
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
    """`POST /api/plugins/reload {"name"}` (422 if it fails; the old generation serves).

    Reloading `plugin_admin` itself is answered 202 and done once this request has left:
    the reload waits for the requests inside the old generation, this one included.
    """
    kernel = request.scope["nekobot.kernel"]
    name = await _name(request)
    if name == OWN_NAME:
        kernel.task_group.start_soon(_reload_later, kernel, name)
        return success(
            {"plugin": plugin_json(kernel.plugins.info(name)), "scheduled": True}, status=202
        )
    return success(result_json(await kernel.plugins.reload(name)))


async def _reload_later(kernel: Any, name: str) -> None:
    try:
        await kernel.plugins.reload(name)
    except Exception as exc:  # reported by the plugin.failed event and the log
        log.error("reload of %r failed: %s", name, exc)


async def rescan(request: Request) -> JSONResponse:
    """`POST /api/plugins/rescan`: pick up plugin folders copied into a plugin directory
    by hand (hot reload does this by itself when it is on); returns the new names."""
    check_query(request, ())
    await read_json(request, {})
    kernel = request.scope["nekobot.kernel"]
    added = await kernel.plugins.rescan()
    return success({"added": sorted(added)})


async def delete(request: Request) -> JSONResponse:
    """`DELETE /api/plugins/delete?name=` (or JSON body); `keep_data` keeps its storage."""
    check_query(request, ("name", "keep_data"))
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(request, {"name": str, "keep_data": bool})
    name = request.query_params.get("name") or body.get("name")
    if not name:
        raise ApiError(400, "field 'name' is required", "missing_field", {"field": "name"})
    keep = flag(request.query_params.get("keep_data", body.get("keep_data")), "keep_data")
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
    return success({"name": name, "config": mask_config(config, schema), "schema": schema})


async def put_config(request: Request) -> JSONResponse:
    """`PUT /api/plugins/config {"name","config"}`: validated against the schema, live."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(request, {"name": str, "config": dict}, required=("name", "config"))
    name = body["name"]
    schema = kernel.plugins.config_schema(name)
    # What GET showed (masked) is the effective configuration, defaults included.
    current = await kernel.plugins.get_config(name)
    config = unmask_config(body["config"], current, schema)
    full = await kernel.plugins.set_config(name, config)
    return success({"name": name, "config": mask_config(full, schema), "schema": schema})


_NAME = {**STR, "description": "plugin name"}
_BY_NAME = operation(json_body({"name": _NAME}, ("name",)), returns(ref("OperationResult")))
_CONFIG = returns(
    obj(
        {"name": STR, "config": {"type": "object"}, "schema": {"type": ["object", "null"]}},
        ("name", "config", "schema"),
    )
)


@hookimpl
async def nekobot_config_changed(ctx: PluginContext, config: Mapping[str, Any]) -> None:
    """Nothing to configure; having this hook applies a change without a reload (which
    would wait for the very request that asked for it)."""


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/plugins",
            list_plugins,
            name="list_plugins",
            summary="Every plugin",
            openapi=operation(
                {"parameters": page_params(_SORT_FIELDS, "name")},
                query(
                    param("state", {"enum": list(_STATES)}),
                    param("source", {"enum": list(_SOURCES)}),
                ),
                returns(page_of(ref("Plugin"))),
            ),
        ),
        RouteSpec(
            "/api/plugins/enable",
            enable,
            methods=("POST",),
            name="enable_plugin",
            summary="Enable a plugin",
            openapi=_BY_NAME,
        ),
        RouteSpec(
            "/api/plugins/disable",
            disable,
            methods=("POST",),
            name="disable_plugin",
            summary="Disable a plugin",
            openapi=_BY_NAME,
        ),
        RouteSpec(
            "/api/plugins/reload",
            reload,
            methods=("POST",),
            name="reload_plugin",
            summary="Reload a plugin transactionally",
            openapi=operation(
                _BY_NAME,
                # Reloading plugin_admin itself is scheduled: 202 once this request left.
                returns(
                    obj(
                        {"plugin": ref("Plugin"), "scheduled": {"const": True}},
                        ("plugin", "scheduled"),
                    ),
                    status="202",
                ),
            ),
        ),
        RouteSpec(
            "/api/plugins/rescan",
            rescan,
            methods=("POST",),
            name="rescan_plugins",
            summary="Pick up plugins copied into a plugin directory",
            openapi=operation(
                json_body({}, optional=True),
                returns(obj({"added": STR_LIST}, ("added",))),
            ),
        ),
        RouteSpec(
            "/api/plugins/upload",
            upload_plugin,
            methods=("POST",),
            name="upload_plugin",
            summary="Upload a plugin as a zip",
            openapi=UPLOAD_OPENAPI,
            body_limit=upload_body_limit,
        ),
        RouteSpec(
            "/api/plugins/delete",
            delete,
            methods=("DELETE",),
            name="delete_plugin",
            summary="Delete a user plugin",
            openapi=operation(
                query(
                    param("name", _NAME),
                    param("keep_data", {"type": "boolean", "default": False}),
                ),
                json_body({"name": _NAME, "keep_data": {"type": "boolean"}}, optional=True),
                returns(
                    {
                        "allOf": [ref("OperationResult")],
                        "required": ["deleted", "data_kept"],
                        "properties": {
                            "deleted": {"const": True},
                            "data_kept": {"type": "boolean"},
                        },
                    }
                ),
            ),
        ),
        RouteSpec(
            "/api/plugins/config",
            get_config,
            methods=("GET",),
            name="get_plugin_config",
            summary="A plugin's configuration and schema",
            openapi=operation(query(param("name", _NAME, required=True)), _CONFIG),
        ),
        RouteSpec(
            "/api/plugins/config",
            put_config,
            methods=("PUT",),
            name="put_plugin_config",
            summary="Change a plugin's configuration",
            openapi=operation(
                json_body({"name": _NAME, "config": {"type": "object"}}, ("name", "config")),
                _CONFIG,
            ),
        ),
    ]
