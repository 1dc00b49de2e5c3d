"""Tests of kernel.asgi: plugin routes and middleware served through the kernel's ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from kernel import ConflictError, PluginLoadError, PluginState
from kernel.kernel import Kernel
from kernel.testing import PATIENCE, running_kernel
from tests.plugin_factory import write_plugin


@asynccontextmanager
async def client_of(kernel: Kernel) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client that talks to the kernel's ASGI app in process (no network)."""
    transport = httpx.ASGITransport(app=kernel.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
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
        assert info.error is not None
        assert "route 'GET /asgi/shared' is already registered by plugin 'asgi_one'" in info.error
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


# A plugin with a middleware and a route. The middleware holds a request that asks for it
# (`x-block: yes`) until the test releases it, or forever with `x-block: forever`.
_GATED = """
import anyio
from starlette.responses import PlainTextResponse

from kernel import MiddlewareSpec, RouteSpec, hookimpl

TAG = "{tag}"


def tagging(app):
    async def middleware(scope, receive, send):
        block = dict(scope.get("headers", ())).get(b"x-block")
        if block is not None:
            probe = scope["nekobot.kernel"].services.current(dict)
            probe["inside"].set()
            await (probe["release"] if block == b"yes" else anyio.Event()).wait()

        async def tagged(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"x-mw", TAG.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, tagged)

    return middleware


async def own(request):
    return PlainTextResponse(TAG)


async def reload_self(request):
    await request.scope["nekobot.kernel"].plugins.reload("asgi_gated")
    return PlainTextResponse("reloaded")


async def hang(request):
    request.scope["nekobot.kernel"].services.current(dict)["inside"].set()
    await anyio.Event().wait()


@hookimpl
def nekobot_http_middleware():
    return [MiddlewareSpec("asgi_gated_tag", tagging)]


@hookimpl
def nekobot_routes():
    return [
        RouteSpec("/asgi/gated", own, public=True),
        RouteSpec("/asgi/gated/reload", reload_self, methods=("POST",), public=True),
        RouteSpec("/asgi/gated/hang", hang, public=True),
    ]
"""


def _gated(tag: str) -> str:
    return _GATED.replace("{tag}", tag)


def _provide_probe(kernel: Kernel) -> dict[str, anyio.Event]:
    probe = {"inside": anyio.Event(), "release": anyio.Event()}
    kernel.services.provide("tests", dict, probe)
    return probe


@pytest.mark.anyio
async def test_a_request_inside_middleware_delays_its_retirement(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "asgi_gated", _gated("v1"))
    write_plugin(plugins, "asgi_routes", _ROUTES)
    # A gate timeout far beyond the test: nothing here may depend on it running out.
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[plugins], handler_timeout=3600) as kernel,
        client_of(kernel) as client,
    ):
        probe = _provide_probe(kernel)
        responses: dict[str, httpx.Response] = {}
        reloaded = anyio.Event()

        async def get(key: str, path: str, block: bool = False) -> None:
            headers = {"x-block": "yes"} if block else {}
            responses[key] = await client.get(path, headers=headers)

        async def reload() -> None:
            await kernel.plugins.reload("asgi_gated")
            reloaded.set()

        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:
                # Blocked inside the v1 middleware, bound for the plugin's own route.
                tg.start_soon(get, "held", "/asgi/gated", True)
                await probe["inside"].wait()
                write_plugin(plugins, "asgi_gated", _gated("v2"))
                tg.start_soon(reload)
                await anyio.wait_all_tasks_blocked()
                # The reload waits for the request inside the old middleware.
                assert not reloaded.is_set()
                assert kernel.plugins.info("asgi_gated").state is PluginState.UNLOADING
                # A request arriving now does not enter the retiring middleware: it waits.
                tg.start_soon(get, "new", "/asgi/public")
                await anyio.wait_all_tasks_blocked()
                assert "new" not in responses
                probe["release"].set()
        assert reloaded.is_set()
        # The held request finished in the generation it entered (its route included).
        held = responses["held"]
        assert (held.status_code, held.text, held.headers["x-mw"]) == (200, "v1", "v1")
        # The new one was served through the new generation's middleware.
        assert responses["new"].status_code == 200
        assert responses["new"].headers["x-mw"] == "v2"
        assert kernel.asgi_app.kernel is kernel
        assert (await client.get("/asgi/gated")).text == "v2"


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["middleware", "route"])
async def test_a_request_outliving_the_gate_timeout_gets_503(tmp_path: Path, where: str) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "asgi_gated", _gated("v1"))
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[plugins], handler_timeout=0.1) as kernel,
        client_of(kernel) as client,
    ):
        probe = _provide_probe(kernel)
        responses: list[httpx.Response] = []

        async def get() -> None:
            if where == "middleware":
                response = await client.get("/asgi/gated", headers={"x-block": "forever"})
            else:
                response = await client.get("/asgi/gated/hang")
            responses.append(response)

        with anyio.fail_after(PATIENCE):  # a hang fails the test instead of stalling the suite
            async with anyio.create_task_group() as tg:
                tg.start_soon(get)
                await probe["inside"].wait()
                await kernel.plugins.disable("asgi_gated")
        [response] = responses
        _assert_envelope(response, 503, "unavailable")
        assert "asgi_gated" in response.json()["message"]
        errors = [r.message for r in kernel.logging.buffer.records if r.level == "ERROR"]
        path = "'/asgi/gated'" if where == "middleware" else "'/asgi/gated/hang'"
        assert any(
            m.startswith("cancelled request") and path in m and "'asgi_gated'" in m for m in errors
        ), errors
        _assert_envelope(await client.get("/asgi/gated"), 404, "not_found")


@pytest.mark.anyio
async def test_a_request_reloading_the_plugin_of_its_middleware(tmp_path: Path) -> None:
    """An admin request that passed through a plugin's middleware may reload that plugin:
    the reload does not wait for (or cancel) the request that runs it."""
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "asgi_gated", _gated("v1"))
    async with (
        running_kernel(tmp_path / "data", plugin_dirs=[plugins], handler_timeout=3600) as kernel,
        client_of(kernel) as client,
    ):
        write_plugin(plugins, "asgi_gated", _gated("v2"))
        with anyio.fail_after(PATIENCE):
            response = await client.post("/asgi/gated/reload")
        assert (response.status_code, response.text) == (200, "reloaded")
        assert kernel.plugins.info("asgi_gated").reload_count == 1
        assert (await client.get("/asgi/gated")).headers["x-mw"] == "v2"


@pytest.mark.anyio
async def test_a_websocket_through_middleware_is_closed_when_it_goes(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "asgi_gated", _gated("v1"))
    write_plugin(plugins, "asgi_sockets", _SOCKETS)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        sent: list[dict[str, object]] = []
        accepted, never = anyio.Event(), anyio.Event()

        async def receive() -> dict[str, object]:
            if not sent:
                return {"type": "websocket.connect"}
            await never.wait()
            raise AssertionError("unreachable")

        async def send(message: dict[str, object]) -> None:
            sent.append(message)
            if message["type"] == "websocket.accept":
                accepted.set()

        scope = {"type": "websocket", "path": "/asgi/socket", "headers": [], "query_string": b""}
        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kernel.asgi_app, scope, receive, send)
                await accepted.wait()
                # The connection does not hold the middleware's gate: no wait here.
                await kernel.plugins.disable("asgi_gated")
        assert sent[-1] == {"type": "websocket.close", "code": 1012}


_SOCKETS = """
import anyio

from kernel import RouteSpec, hookimpl


async def socket(websocket):
    await websocket.accept()
    await anyio.Event().wait()


@hookimpl
def nekobot_routes():
    return [RouteSpec("/asgi/socket", socket, public=True, websocket=True)]
"""
