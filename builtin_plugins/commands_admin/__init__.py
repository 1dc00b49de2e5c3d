"""The command registry over the API: listing, conflicts and their resolution."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.openapi import (
    json_body,
    operation,
    page_of,
    page_params,
    param,
    query,
    ref,
    returns,
)
from builtin_plugins.api.shapes import command_json, conflict_json
from builtin_plugins.api.web import PAGE_PARAMS, ApiError, check_query, paginate, read_json, success
from kernel import KernelEvent, RouteSpec, hookimpl


async def list_commands(request: Request) -> JSONResponse:
    """`GET /api/commands`."""
    check_query(request, (*PAGE_PARAMS, "plugin"))
    kernel = request.scope["nekobot.kernel"]
    plugin = request.query_params.get("plugin")
    items = [
        command_json(kernel, e)
        for e in kernel.commands.entries()
        if plugin is None or e.owner == plugin
    ]
    return success(
        paginate(
            request, items, sort_fields=("name", "plugin", "qualified_name"), default_sort="name"
        )
    )


async def list_conflicts(request: Request) -> JSONResponse:
    """`GET /api/commands/conflicts`."""
    check_query(request, PAGE_PARAMS)
    kernel = request.scope["nekobot.kernel"]
    items = [conflict_json(c) for c in kernel.commands.conflicts()]
    return success(paginate(request, items, sort_fields=("key", "holder"), default_sort="key"))


async def resolve_conflict(request: Request) -> JSONResponse:
    """`POST /api/commands/conflicts/resolve {"key","plugin"}`: persisted, applied live.

    `plugin: null` withdraws the admin's choice (the current holder keeps the name).
    """
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(
        request, {"key": str, "plugin": (str, type(None))}, required=("key", "plugin")
    )
    from kernel.errors import NekoError

    try:
        if body["plugin"] is None:
            kernel.commands.unresolve(body["key"])
        else:
            kernel.commands.resolve(body["key"], body["plugin"])
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_field", {"field": "key"}) from None
    except NekoError as exc:
        raise ApiError(404, exc.message, "not_found", {"field": "plugin"}) from None
    await kernel.persist_commands()
    await kernel.emit(KernelEvent("command.conflict_resolved", body))
    key = body["key"].strip().casefold()
    current = [c for c in kernel.commands.conflicts() if c.key == key]
    return success(
        {
            "key": key,
            "holder": kernel.commands.holder_of(key),
            "conflict": conflict_json(current[0]) if current else None,
        }
    )


async def add_alias(request: Request) -> JSONResponse:
    """`POST /api/commands/aliases {"alias","command"}`: a new key for `plugin:name`."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(request, {"alias": str, "command": str}, required=("alias", "command"))
    from kernel.errors import NekoError

    try:
        kernel.commands.add_alias(body["alias"], body["command"])
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_field", {"field": "alias"}) from None
    except NekoError as exc:
        raise ApiError(404, exc.message, "not_found", {"field": "command"}) from None
    await kernel.persist_commands()
    key = body["alias"].strip().casefold()
    return success(
        {
            "alias": key,
            "command": body["command"].casefold(),
            "holder": kernel.commands.holder_of(key),
        },
        status=201,
    )


async def remove_alias(request: Request) -> JSONResponse:
    """`DELETE /api/commands/aliases {"alias"}`."""
    check_query(request, ())
    kernel = request.scope["nekobot.kernel"]
    body = await read_json(request, {"alias": str}, required=("alias",))
    from kernel.errors import NekoError

    try:
        kernel.commands.remove_alias(body["alias"])
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_field", {"field": "alias"}) from None
    except NekoError as exc:
        raise ApiError(404, exc.message, "not_found", {"field": "alias"}) from None
    await kernel.persist_commands()
    return success({"removed": body["alias"].strip().casefold()})


_STR = {"type": "string"}


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/commands",
            list_commands,
            name="list_commands",
            summary="Every registered command",
            openapi=operation(
                {"parameters": page_params(("name", "plugin", "qualified_name"), "name")},
                query(param("plugin", _STR, description="only this plugin's commands")),
                returns(page_of(ref("Command"))),
            ),
        ),
        RouteSpec(
            "/api/commands/conflicts",
            list_conflicts,
            name="list_command_conflicts",
            summary="Command names claimed by more than one plugin",
            openapi=operation(
                {"parameters": page_params(("key", "holder"), "key")},
                returns(page_of(ref("Conflict"))),
            ),
        ),
        RouteSpec(
            "/api/commands/conflicts/resolve",
            resolve_conflict,
            methods=("POST",),
            name="resolve_command_conflict",
            summary="Choose which plugin holds a name",
            openapi=operation(
                json_body({"key": _STR, "plugin": {"type": ["string", "null"]}}, ("key", "plugin")),
                returns(
                    {
                        "type": "object",
                        "required": ["key", "holder", "conflict"],
                        "properties": {
                            "key": _STR,
                            "holder": {"type": ["string", "null"]},
                            "conflict": {"oneOf": [ref("Conflict"), {"type": "null"}]},
                        },
                    }
                ),
            ),
        ),
        RouteSpec(
            "/api/commands/aliases",
            add_alias,
            methods=("POST",),
            name="add_command_alias",
            summary="Give a command an extra name",
            openapi=operation(
                json_body(
                    {
                        "alias": _STR,
                        "command": {**_STR, "description": "qualified name, plugin:command"},
                    },
                    ("alias", "command"),
                ),
                returns(
                    {
                        "type": "object",
                        "required": ["alias", "command", "holder"],
                        "properties": {
                            "alias": _STR,
                            "command": _STR,
                            "holder": {"type": ["string", "null"]},
                        },
                    }
                ),
            ),
        ),
        RouteSpec(
            "/api/commands/aliases",
            remove_alias,
            methods=("DELETE",),
            name="remove_command_alias",
            summary="Remove an admin-added alias",
            openapi=operation(
                json_body({"alias": _STR}, ("alias",)),
                returns({"type": "object", "properties": {"removed": _STR}}),
            ),
        ),
    ]
