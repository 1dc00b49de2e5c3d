"""The Kernel object itself: chain hooks, route context, WebSocket disposal, test helpers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kernel.testing import PATIENCE, AsPrincipal, running_kernel
from tests.plugin_factory import write_plugin

pytestmark = pytest.mark.anyio

CHAIN = """
from kernel import hookimpl

@hookimpl
async def nekobot_llm_request(request, ctx):
    {body}
"""


async def test_run_chain_passes_value_in_plugin_name_order(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins,
        "kk_chain_b",
        CHAIN.format(body='return {**request, "trail": request["trail"] + ["b"]}'),
    )
    write_plugin(
        plugins,
        "kk_chain_a",
        CHAIN.format(body='return {**request, "trail": request["trail"] + ["a"]}'),
    )
    write_plugin(plugins, "kk_chain_c", CHAIN.format(body="return None"))
    write_plugin(plugins, "kk_chain_d", CHAIN.format(body='raise RuntimeError("boom")'))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        result = await kernel.run_chain("nekobot_llm_request", "request", {"trail": []})
        assert result == {"trail": ["a", "b"]}
        records = [r for r in kernel.logging.buffer.records if r.plugin == "kk_chain_d"]
        assert any("boom" in r.message for r in records)


ROUTES = """
from kernel import hookimpl, RouteSpec
from starlette.responses import PlainTextResponse

async def whoami(request):
    return PlainTextResponse(request.scope["nekobot.ctx"].name)

async def sock(ws):
    await ws.accept()
    await ws.send_text("hello")
    while True:
        await ws.receive_text()

@hookimpl
def nekobot_routes():
    return [RouteSpec("/kk/whoami", whoami), RouteSpec("/kk/ws", sock, websocket=True)]
"""


async def test_route_gets_its_plugin_context(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "kk_routes", ROUTES)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        transport = httpx.ASGITransport(app=AsPrincipal(kernel.asgi_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            r = await c.get("/kk/whoami")
            assert r.status_code == 200
            assert r.text == "kk_routes"
        bare = httpx.ASGITransport(app=kernel.asgi_app)
        async with httpx.AsyncClient(transport=bare, base_url="http://localhost") as c:
            assert (await c.get("/kk/whoami")).status_code == 401


async def test_open_websocket_does_not_block_disable_and_is_closed(tmp_path: Path) -> None:
    import anyio
    from starlette.types import Message

    plugins = tmp_path / "plugins"
    write_plugin(plugins, "kk_ws", ROUTES.replace("kk_routes", "kk_ws"))
    # A disable that waited for the open socket would wait out the handler timeout:
    # one far beyond the test's patience.
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], handler_timeout=3600
    ) as kernel:
        app = AsPrincipal(kernel.asgi_app)
        to_app = anyio.create_memory_object_stream[Message](10)
        from_app = anyio.create_memory_object_stream[Message](10)
        scope = {
            "type": "websocket",
            "path": "/kk/ws",
            "raw_path": b"/kk/ws",
            "query_string": b"",
            "headers": [],
            "scheme": "ws",
            "server": ("t", 80),
            "client": ("127.0.0.1", 1),
            "root_path": "",
            "subprotocols": [],
            "asgi": {"version": "3.0"},
        }
        async with to_app[0], to_app[1], from_app[0], from_app[1], anyio.create_task_group() as tg:
            tg.start_soon(app, scope, to_app[1].receive, from_app[0].send)
            await to_app[0].send({"type": "websocket.connect"})
            assert (await from_app[1].receive())["type"] == "websocket.accept"
            assert (await from_app[1].receive())["text"] == "hello"
            with anyio.fail_after(PATIENCE):  # not the handler timeout
                await kernel.plugins.disable("kk_ws")
            with anyio.fail_after(PATIENCE):
                closing = await from_app[1].receive()
            assert closing == {"type": "websocket.close", "code": 1012}


ADAPTER = """
from kernel import AdapterStats, Capabilities, SendResult, hookimpl

class Sink:
    capabilities = Capabilities()
    stats = AdapterStats("running")

    def __init__(self):
        self.sent = []

    async def start(self):
        pass

    async def stop(self):
        pass

    async def send(self, target, reply):
        self.sent.append(reply.plain_text)
        return SendResult()

SINK = Sink()

@hookimpl
async def nekobot_plugin_start(ctx):
    ctx.attach_adapter("kk-platform-1", SINK)
"""


async def test_attached_adapter_is_detached_with_its_plugin(tmp_path: Path) -> None:
    import sys

    from kernel import Reply, Target

    plugins = tmp_path / "plugins"
    write_plugin(plugins, "kk_adapter", ADAPTER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        target = Target("kk-platform-1", "private", "someone")
        await kernel.pipeline.send(target, Reply.text("hi"))
        assert sys.modules["kk_adapter"].SINK.sent == ["hi"]
        await kernel.plugins.disable("kk_adapter")
        assert "kk-platform-1" not in kernel.pipeline.adapters
        with pytest.raises(LookupError):
            await kernel.pipeline.send(target, Reply.text("gone"))
