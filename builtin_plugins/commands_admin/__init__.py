"""The command registry over the API: listing, conflicts and their resolution."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.openapi import (
    NULLABLE_STR,
    STR,
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
from builtin_plugins.api.shapes import command_json, conflict_json
from builtin_plugins.api.web import PAGE_PARAMS, ApiError, check_query, paginate, read_json, success
from kernel import KernelEvent, RouteSpec, hookimpl
from kernel.commands import normalize_key
from kernel.errors import CommandNotFoundError


@contextmanager
def _registry_errors(*, invalid: str, missing: str) -> Iterator[None]:
    """The registry's errors as answers: a name that cannot be a command key is a 400
    naming `invalid`; what the registry does not know is a 404 naming `missing`."""
    try:
        yield
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_field", {"field": invalid}) from None
    except CommandNotFoundError as exc:
        raise ApiError(404, exc.message, "not_found", {"field": missing}) from None


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
    with _registry_errors(invalid="key", missing="plugin"):
        key = normalize_key(body["key"])
        if body["plugin"] is None:
            kernel.commands.unresolve(key)
        else:
            kernel.commands.resolve(key, body["plugin"])
    await kernel.persist_commands()
    await kernel.emit(KernelEvent("command.conflict_resolved", body))
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
    with _registry_errors(invalid="alias", missing="command"):
        key = normalize_key(body["alias"])
        kernel.commands.add_alias(key, body["command"])
    await kernel.persist_commands()
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
    with _registry_errors(invalid="alias", missing="alias"):
        key = normalize_key(body["alias"])
        kernel.commands.remove_alias(key)
    await kernel.persist_commands()
    return success({"removed": key})


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
                query(param("plugin", STR, description="only this plugin's commands")),
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
                json_body({"key": STR, "plugin": NULLABLE_STR}, ("key", "plugin")),
                returns(
                    obj(
                        {
                            "key": STR,
                            "holder": NULLABLE_STR,
                            "conflict": {"oneOf": [ref("Conflict"), {"type": "null"}]},
                        },
                        ("key", "holder", "conflict"),
                    )
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
                        "alias": STR,
                        "command": {**STR, "description": "qualified name, plugin:command"},
                    },
                    ("alias", "command"),
                ),
                returns(
                    obj(
                        {"alias": STR, "command": STR, "holder": NULLABLE_STR},
                        ("alias", "command", "holder"),
                    )
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
                json_body({"alias": STR}, ("alias",)),
                returns(obj({"removed": STR})),
            ),
        ),
    ]
