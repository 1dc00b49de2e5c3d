"""`GET /api/openapi.json` over a real server: a valid OpenAPI 3.1 document of every HTTP
route in the live registry, that follows plugins as they come and go."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from tests.builtin_plugins.conftest import ApiServer
from tests.plugin_factory import purge_modules, write_plugin

pytestmark = pytest.mark.anyio

ROUTES_PLUGIN = """
from starlette.responses import JSONResponse
from kernel import RouteSpec, hookimpl

async def item(request):
    return JSONResponse({"id": request.path_params["item_id"]})

async def listing(request):
    return JSONResponse([])

@hookimpl
def nekobot_routes():
    return [
        RouteSpec("/api/zoa_items/{item_id}", item, methods=("GET", "DELETE")),
        RouteSpec("/api/zoa_items/{item_id:int}/parts/{part}", item, name="zoa_part"),
        # The same route name as a builtin's: operation ids must stay unique.
        RouteSpec("/api/zoa_items", listing, name="list_plugins"),
        RouteSpec("/api/zoa_items/x-y.z", listing, methods=("POST",), name="weird name!"),
        RouteSpec("/api/zoa_public", listing, public=True,
                  openapi={"description": "extra", "parameters": [
                      {"name": "q", "in": "query", "schema": {"type": "string"}}]}),
    ]
"""


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }


def registry_operations(api: ApiServer) -> set[tuple[str, str]]:
    out = set()
    for entry in api.kernel.routes:
        (path, method), route = entry.item
        if not route.websocket:
            out.add((re.sub(r"{([^}:]+)(:[^}]*)?}", r"{\1}", path), method))
    return out


async def fetch(c: httpx.AsyncClient) -> dict[str, Any]:
    r = await c.get("/api/openapi.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    validate(doc)  # raises if the document is not valid OpenAPI
    assert doc["openapi"].startswith("3.1")
    ids = Counter(
        op["operationId"]
        for item in doc["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    )
    assert not [i for i, n in ids.items() if n > 1], ids
    return doc


async def test_openapi_requires_a_token(api: ApiServer) -> None:
    async with api.client() as c:
        r = await c.get("/api/openapi.json")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"


async def test_document_is_valid_and_lists_every_http_route(api: ApiServer) -> None:
    async with api.authed() as c:
        doc = await fetch(c)
    assert operations(doc) == registry_operations(api)
    assert "/ws" not in doc["paths"]
    for path, method in (
        ("/api/login", "post"),
        ("/api/plugins", "get"),
        ("/api/plugins/config", "put"),
        ("/api/settings", "put"),
        ("/api/logs", "get"),
    ):
        assert method in doc["paths"][path]
    # Public routes say so; the others require the bearer token.
    assert doc["paths"]["/api/login"]["post"]["security"] == []
    assert doc["paths"]["/api/health"]["get"]["security"] == []
    assert doc["paths"]["/api/plugins"]["get"].get("security", doc["security"]) == [
        {"bearerAuth": []}
    ]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


async def test_document_follows_plugins_as_they_come_and_go(api: ApiServer) -> None:
    purge_modules("zoa_routes")
    write_plugin(api.plugin_dir, "zoa_routes", ROUTES_PLUGIN)
    async with api.authed() as c:
        before = await fetch(c)
        assert not any(p.startswith("/api/zoa") for p in before["paths"])
        assert (await c.post("/api/plugins/rescan")).json()["data"]["added"] == ["zoa_routes"]
        r = await c.post("/api/plugins/enable", json={"name": "zoa_routes"})
        assert r.status_code == 200, r.text

        during = await fetch(c)
        assert operations(during) == registry_operations(api)
        item = during["paths"]["/api/zoa_items/{item_id}"]
        assert set(item) >= {"get", "delete"}
        assert [p["name"] for p in item["get"]["parameters"] if p["in"] == "path"] == ["item_id"]
        part = during["paths"]["/api/zoa_items/{item_id}/parts/{part}"]["get"]
        assert {p["name"] for p in part["parameters"] if p["in"] == "path"} == {"item_id", "part"}
        assert part["tags"] == ["zoa_routes"]
        public = during["paths"]["/api/zoa_public"]["get"]
        assert public["security"] == [] and public["description"] == "extra"
        assert "q" in [p["name"] for p in public["parameters"]]
        # The builtin keeps its operation id; the newcomer's differs.
        assert during["paths"]["/api/plugins"]["get"]["operationId"] == "list_plugins_get"
        assert during["paths"]["/api/zoa_items"]["get"]["operationId"] != "list_plugins_get"
        # The plugin's route answers as documented.
        assert (await c.get("/api/zoa_items/7")).json() == {"id": "7"}

        r = await c.post("/api/plugins/disable", json={"name": "zoa_routes"})
        assert r.status_code == 200
        after = await fetch(c)
        assert not any(p.startswith("/api/zoa") for p in after["paths"])
        assert operations(after) == operations(before) == registry_operations(api)
