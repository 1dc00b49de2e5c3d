"""`GET /api/openapi.json`: an OpenAPI 3.1 document built from the live route registry,
so that it describes plugin routes too and follows plugins as they come and go."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
    "413": "Too large",
    "422": "Valid input that could not be applied",
    "429": "Rate limited",
    "503": "Temporarily unavailable",
}

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


async def openapi_json(request: Request) -> JSONResponse:
    """`GET /api/openapi.json`."""
    return JSONResponse(build_document(request.scope["nekobot.kernel"]))
