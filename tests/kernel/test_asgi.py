"""Tests of kernel.asgi: plugin routes and middleware served through the kernel's ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from kernel import ConflictError, PluginLoadError, PluginState
from kernel.kernel import Kernel
from kernel.testing import running_kernel
from tests.plugin_factory import write_plugin


@asynccontextmanager
async def client_of(kernel: Kernel) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client that talks to the kernel's ASGI app in process (no network)."""
    transport = httpx.ASGITransport(app=kernel.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://nekobot.test") as client:
        yield client


_ROUTES = """
from starlette.responses import JSONResponse

from kernel import RouteSpec, hookimpl


async def public(request):
    return JSONResponse({"status": "success", "data": "public"})


async def private(request):
    principal = request.scope["nekobot.principal"]
    return JSONResponse({"status": "success", "data": {"principal": principal}})


async def create(request):
    return JSONResponse({"status": "success", "data": await request.json()}, status_code=201)


@hookimpl
def nekobot_routes():
    return [
        RouteSpec("/asgi/public", public, public=True),
        RouteSpec("/asgi/private", private),
        RouteSpec("/asgi/items/{id}", private),
        RouteSpec("/asgi/public", create, methods=("POST",), public=True),
    ]
"""

_AUTH = """
from kernel import MiddlewareSpec, hookimpl


def authenticate(app):
    async def middleware(scope, receive, send):
        if scope["type"] == "http" and (b"x-test-auth", b"yes") in scope["headers"]:
            scope = {**scope, "nekobot.principal": "tester"}
        await app(scope, receive, send)

    return middleware


@hookimpl
def nekobot_http_middleware():
    return [MiddlewareSpec("asgi_test_auth", authenticate)]
"""

_CLASH = """
from starlette.responses import PlainTextResponse

from kernel import RouteSpec, hookimpl


async def endpoint(request):
    return PlainTextResponse("{name}")


@hookimpl
def nekobot_routes():
    return [RouteSpec("/asgi/shared", endpoint, public=True)]
"""


def _assert_envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "error"
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]


@pytest.mark.anyio
async def test_public_private_and_unknown_routes(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "asgi_routes", _ROUTES)
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel,
        client_of(kernel) as client,
    ):
        response = await client.get("/asgi/public")
        assert response.status_code == 200
        assert response.json() == {"status": "success", "data": "public"}
        response = await client.post("/asgi/public", json={"x": 1})
        assert response.status_code == 201 and response.json()["data"] == {"x": 1}

        # Private by default: nothing vouches for the request.
        _assert_envelope(await client.get("/asgi/private"), 401, "unauthorized")
        _assert_envelope(await client.get("/asgi/items/7"), 401, "unauthorized")
        # A header alone does not authenticate without a middleware that checks it.
        _assert_envelope(
            await client.get("/asgi/private", headers={"x-test-auth": "yes"}), 401, "unauthorized"
        )
        _assert_envelope(await client.get("/asgi/nowhere"), 404, "not_found")
        assert kernel.plugins.info("asgi_routes").routes == (
            "GET /asgi/items/{id}",
            "GET /asgi/private",
            "GET /asgi/public",
            "POST /asgi/public",
        )


@pytest.mark.anyio
async def test_a_middleware_plugin_authenticates_private_routes(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "asgi_routes", _ROUTES)
    write_plugin(plugins, "asgi_auth", _AUTH)
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel,
        client_of(kernel) as client,
    ):
        response = await client.get("/asgi/private", headers={"x-test-auth": "yes"})
        assert response.status_code == 200
        assert response.json()["data"] == {"principal": "tester"}
        _assert_envelope(await client.get("/asgi/private"), 401, "unauthorized")
        _assert_envelope(
            await client.get("/asgi/private", headers={"x-test-auth": "no"}), 401, "unauthorized"
        )
        # Withdrawing the middleware withdraws the authentication.
        await kernel.plugins.disable("asgi_auth")
        _assert_envelope(
            await client.get("/asgi/private", headers={"x-test-auth": "yes"}), 401, "unauthorized"
        )
        await kernel.plugins.enable("asgi_auth")
        response = await client.get("/asgi/private", headers={"x-test-auth": "yes"})
        assert response.status_code == 200


@pytest.mark.anyio
async def test_disabling_a_plugin_removes_its_routes(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "asgi_routes", _ROUTES)
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel,
        client_of(kernel) as client,
    ):
        assert (await client.get("/asgi/public")).status_code == 200
        await kernel.plugins.disable("asgi_routes")
        _assert_envelope(await client.get("/asgi/public"), 404, "not_found")
        _assert_envelope(await client.get("/asgi/private"), 404, "not_found")
        assert len(kernel.routes) == 0
        await kernel.plugins.enable("asgi_routes")
        assert (await client.get("/asgi/public")).status_code == 200
        await kernel.plugins.reload("asgi_routes")
        assert (await client.get("/asgi/public")).status_code == 200
        _assert_envelope(await client.get("/asgi/private"), 401, "unauthorized")


@pytest.mark.anyio
async def test_health_of_the_builtin_api(tmp_path: Path) -> None:
    async with (
        running_kernel(tmp_path / "data", builtin_plugins=["api"]) as kernel,
        client_of(kernel) as client,
    ):
        assert kernel.plugins.info("api").state is PluginState.ACTIVE
        response = await client.get("/api/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "success"
        assert body["data"]["status"] == "ok"
        assert body["data"]["plugins"] >= 1
        # The API core keeps the kernel's error envelope.
        _assert_envelope(await client.get("/api/nowhere"), 404, "not_found")


@pytest.mark.anyio
async def test_two_plugins_claiming_one_route_conflict(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    for name in ("asgi_one", "asgi_two"):
        write_plugin(plugins, name, _CLASH.replace("{name}", name))
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel,
        client_of(kernel) as client,
    ):
        assert kernel.plugins.info("asgi_one").state is PluginState.ACTIVE
        info = kernel.plugins.info("asgi_two")
        assert info.state is PluginState.FAILED
        assert info.error is not None and "already registered by plugin 'asgi_one'" in info.error
        assert (await client.get("/asgi/shared")).text == "asgi_one"

        with pytest.raises(PluginLoadError) as caught:
            await kernel.plugins.enable("asgi_two")
        assert isinstance(caught.value.__cause__, ConflictError)
        assert caught.value.__cause__.holder == "asgi_one"
        assert caught.value.__cause__.newcomer == "asgi_two"
        assert (await client.get("/asgi/shared")).text == "asgi_one"

        # Once the holder is gone, the other plugin can serve the path.
        await kernel.plugins.disable("asgi_one")
        await kernel.plugins.enable("asgi_two")
        assert (await client.get("/asgi/shared")).text == "asgi_two"
