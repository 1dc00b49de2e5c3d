"""`GET /api/openapi.json`: an OpenAPI 3.1 document built from the live route registry,
so that it describes plugin routes too and follows plugins as they come and go."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from kernel.version import __version__

_PARAM_RE = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?}")
_ERROR_STATUSES = {
    "400": "Bad input (the message names the field)",
    "401": "No valid token",
    "403": "Forbidden",
    "404": "Not found",
    "405": "Method not allowed",
    "409": "Conflict",
    "413": "Request body too large",
    "415": "A body that is not JSON (application/json) sent to a JSON endpoint",
    "421": "The Host header names a host the bot does not serve",
    "422": "Valid input that could not be applied",
    "429": "Rate limited",
    "503": "Temporarily unavailable",
}

STR: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "boolean"}
NULLABLE_STR: dict[str, Any] = {"type": ["string", "null"]}
STR_LIST: dict[str, Any] = {"type": "array", "items": STR}


def obj(properties: Mapping[str, Any], required: Iterable[str] = ()) -> dict[str, Any]:
    """The schema of a JSON object with `properties`, the `required` ones listed."""
    out: dict[str, Any] = {"type": "object"}
    if required:
        out["required"] = list(required)
    out["properties"] = dict(properties)
    return out


COMPONENTS: dict[str, Any] = {
    "schemas": {
        "Success": {
            "type": "object",
            "required": ["status", "data"],
            "properties": {"status": {"const": "success"}, "data": {}},
        },
        "Error": {
            "type": "object",
            "required": ["status", "message", "code"],
            "properties": {
                "status": {"const": "error"},
                "message": {"type": "string"},
                "code": {"type": "string"},
                "details": {"type": "object"},
            },
        },
    },
    "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
}

COMPONENTS["schemas"].update(
    {
        "Plugin": obj(
            {
                "name": STR,
                "version": STR,
                "description": STR,
                "author": STR,
                "source": {"enum": ["builtin", "entrypoint", "user"]},
                "essential": BOOL,
                "state": STR,
                "error": NULLABLE_STR,
                "enabled": BOOL,
                "commands": STR_LIST,
                "routes": STR_LIST,
                "hooks": STR_LIST,
                "loaded_at": {"type": ["number", "null"]},
                "reload_count": {"type": "integer", "minimum": 0},
                "last_reload_error": {
                    "oneOf": [
                        {"type": "null"},
                        obj({"message": STR, "time": {"type": "number"}}, ("message", "time")),
                    ]
                },
                "conflicts": {"type": "array", "items": {"$ref": "#/components/schemas/Conflict"}},
            },
            ("name", "version", "source", "essential", "state", "enabled"),
        ),
        "Conflict": obj(
            {
                "key": STR,
                "candidates": {
                    "type": "array",
                    "items": obj(
                        {"plugin": STR, "qualified_name": STR}, ("plugin", "qualified_name")
                    ),
                },
                "holder": STR,
                "resolution": NULLABLE_STR,
            },
            ("key", "candidates", "holder", "resolution"),
        ),
        "OperationResult": obj(
            {
                "plugin": {"$ref": "#/components/schemas/Plugin"},
                "conflicts": {"type": "array", "items": {"$ref": "#/components/schemas/Conflict"}},
                "changed": BOOL,
            },
            ("plugin", "conflicts", "changed"),
        ),
        "Command": obj(
            {
                "name": STR,
                "aliases": STR_LIST,
                "admin_aliases": STR_LIST,
                "qualified_name": STR,
                "plugin": STR,
                "description": STR,
                "usage": STR,
                "permission": {},
                "platforms": {"type": ["array", "null"], "items": STR},
                "enabled": BOOL,
                "holds_name": BOOL,
            },
            ("name", "qualified_name", "plugin", "holds_name"),
        ),
        "LogRecord": obj(
            {
                "seq": {"type": "integer"},
                "time": {"type": "number"},
                "level": STR,
                "logger": STR,
                "plugin": NULLABLE_STR,
                "message": STR,
                "exc_text": NULLABLE_STR,
            },
            ("seq", "time", "level", "logger", "plugin", "message"),
        ),
    }
)


# -- helpers for plugins that describe their routes (`RouteSpec(openapi=...)`) ---------


def ref(name: str) -> dict[str, Any]:
    """A reference to one of the shared component schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(
    properties: Mapping[str, Any],
    required: tuple[str, ...] = (),
    *,
    optional: bool = False,
) -> dict[str, Any]:
    """A JSON object request body; unknown fields are refused (as `read_json` does)."""
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": dict(properties),
    }
    if required:
        schema["required"] = list(required)
    return {
        "requestBody": {
            "required": not optional,
            "content": {"application/json": {"schema": schema}},
        }
    }


def query(*params: Mapping[str, Any]) -> dict[str, Any]:
    """Query parameters, each made by `param`."""
    return {"parameters": [dict(p) for p in params]}


def param(
    name: str, schema: Mapping[str, Any], *, required: bool = False, description: str = ""
) -> dict[str, Any]:
    """One query parameter."""
    out: dict[str, Any] = {"name": name, "in": "query", "required": required, "schema": schema}
    if description:
        out["description"] = description
    return out


def page_params(
    sort_fields: tuple[str, ...], default_sort: str, default_order: str = "asc"
) -> list[dict[str, Any]]:
    """The `page`, `page_size`, `sort_by` and `order` parameters of a list endpoint."""
    return [
        param("page", {"type": "integer", "minimum": 1, "default": 1}, description="1-based"),
        param(
            "page_size",
            {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
        ),
        param("sort_by", {"enum": list(sort_fields), "default": default_sort}),
        param("order", {"enum": ["asc", "desc"], "default": default_order}),
    ]


def page_of(item: Mapping[str, Any]) -> dict[str, Any]:
    """The `data` of a list endpoint: one page of `item`s."""
    return {
        "type": "object",
        "required": ["items", "total", "page", "page_size"],
        "properties": {
            "items": {"type": "array", "items": dict(item)},
            "total": {"type": "integer", "minimum": 0},
            "page": {"type": "integer", "minimum": 1},
            "page_size": {"type": "integer", "minimum": 1, "maximum": 100},
        },
    }


def returns(data: Mapping[str, Any], *, status: str = "200") -> dict[str, Any]:
    """The success response whose envelope carries `data`."""
    return {
        "responses": {
            status: {
                "description": "Success",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["status", "data"],
                            "properties": {"status": {"const": "success"}, "data": dict(data)},
                        }
                    }
                },
            }
        }
    }


def operation(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """Merge fragments made by the helpers above into one `RouteSpec.openapi` mapping."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "parameters":
                out["parameters"] = [*out.get("parameters", []), *value]
            elif key == "responses":
                out["responses"] = {**out.get("responses", {}), **value}
            else:
                out[key] = value
    return out


def _operation(owner: str, route: Any, method: str) -> dict[str, Any]:
    path_params = _PARAM_RE.findall(route.path)
    op: dict[str, Any] = {
        "operationId": f"{route.name or re.sub(r'[^a-zA-Z0-9]+', '_', route.path).strip('_')}"
        f"_{method.lower()}",
        "summary": route.summary or (route.endpoint.__doc__ or "").strip().split("\n")[0],
        "tags": [owner],
        "responses": {
            "200": {
                "description": "Success",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Success"}}
                },
            },
            **{
                code: {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for code, text in _ERROR_STATUSES.items()
            },
        },
    }
    if method in ("POST", "PUT"):
        op["responses"]["201"] = op["responses"]["200"]
    if path_params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in path_params
        ]
    op["security"] = [] if route.public else [{"bearerAuth": []}]
    extra: Mapping[str, Any] = route.openapi or {}
    for key, value in extra.items():
        if key == "parameters":
            op["parameters"] = [*op.get("parameters", []), *value]
        elif key == "responses":
            # A route declares its success shape; the error statuses stay.
            op["responses"] = {**op["responses"], **value}
            if method in ("POST", "PUT") and "200" in value and "201" not in value:
                op["responses"]["201"] = value["200"]
        else:
            op[key] = value
    return op


def build_document(kernel: Any) -> dict[str, Any]:
    """The OpenAPI document of every HTTP route the kernel serves right now."""
    paths: dict[str, dict[str, Any]] = {}
    for entry in kernel.routes:
        (path, method), route = entry.item
        if route.websocket:
            continue
        template = _PARAM_RE.sub(lambda m: "{" + m.group(1) + "}", path)
        paths.setdefault(template, {})[method.lower()] = _operation(entry.owner, route, method)
    _unique_operation_ids(kernel, paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "NekoBot API",
            "version": __version__,
            "description": "The admin API of a NekoBot instance; every route is "
            "contributed by a plugin.",
        },
        "paths": dict(sorted(paths.items())),
        "components": COMPONENTS,
        "security": [{"bearerAuth": []}],
    }


def _unique_operation_ids(kernel: Any, paths: dict[str, dict[str, Any]]) -> None:
    """Make operation ids unique (plugins may reuse a route name): builtins keep theirs,
    then the first by owner and path; the others get their owner's name, or a number."""

    def rank(item: tuple[str, str, dict[str, Any]]) -> tuple[bool, str, str, str]:
        path, method, op = item
        owner = op["tags"][0] if op.get("tags") else ""
        rec = kernel.plugins.records.get(owner)
        builtin = rec is not None and rec.candidate.source.value == "builtin"
        return (not builtin, owner, path, method)

    ops = [(path, method, op) for path, item in paths.items() for method, op in item.items()]
    taken: set[str] = set()
    for _path, _method, op in sorted(ops, key=rank):
        wanted = re.sub(r"[^a-zA-Z0-9_.-]+", "_", op["operationId"])
        if wanted in taken:
            owner = op["tags"][0] if op.get("tags") else "route"
            wanted = f"{owner}.{wanted}"
        base, n = wanted, 2
        while wanted in taken:
            wanted, n = f"{base}_{n}", n + 1
        taken.add(wanted)
        op["operationId"] = wanted


async def openapi_json(request: Request) -> JSONResponse:
    """`GET /api/openapi.json`."""
    return JSONResponse(build_document(request.scope["nekobot.kernel"]))
