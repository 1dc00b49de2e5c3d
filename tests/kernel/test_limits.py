"""kernel.limits, the kernel app's own checks before any plugin code: the body cap of each
route (over a real server: nothing past the cap is read) and the allowed `Host` names."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kernel.kernel import Kernel
from kernel.testing import running_kernel, serving
from tests.plugin_factory import write_plugin

pytestmark = pytest.mark.anyio

_ROUTES = """
from starlette.responses import JSONResponse

from kernel import RouteSpec, hookimpl


async def size(request):
    return JSONResponse({"status": "success", "data": len(await request.body())})


async def streamed(request):
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
    return JSONResponse({"status": "success", "data": total})


@hookimpl
def nekobot_routes():
    return [
        RouteSpec("/limits/default", size, methods=("POST",), public=True),
        RouteSpec("/limits/stream", streamed, methods=("POST",), public=True),
        RouteSpec("/limits/small", size, methods=("POST",), public=True, body_limit=2048),
        RouteSpec(
            "/limits/live",
            size,
            methods=("POST",),
            public=True,
            body_limit=lambda kernel: kernel.settings.request_max_bytes * 4,
        ),
    ]
"""

#: The `request_max_bytes` of these tests.
CAP = 64 * 1024


@contextlib.asynccontextmanager
async def limits_kernel(tmp_path: Path, **options: Any) -> Any:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "limits_routes", _ROUTES)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins], **options) as kernel:
        await kernel.update_settings(request_max_bytes=CAP)
        yield kernel


class CountingApp:
    """Counts the body bytes the server hands to the app: what it had to buffer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


async def exchange(port: int, head: bytes, body_chunks: int = 0, chunk: int = 64 * 1024) -> bytes:
    """Send `head`, then up to `body_chunks` chunks of a chunked body while reading the
    answer; return everything the server wrote before closing the connection."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    answer = b""
    async with stream, anyio.create_task_group() as tg:

        async def feed() -> None:
            piece = b"%x\r\n" % chunk + b"x" * chunk + b"\r\n"
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(head)
                for _ in range(body_chunks):
                    await stream.send(piece)
                if body_chunks:
                    await stream.send(b"0\r\n\r\n")

        tg.start_soon(feed)
        with anyio.fail_after(60):
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    answer += await stream.receive()
        tg.cancel_scope.cancel()  # the rest of the body is not wanted
    return answer


def head(path: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


def assert_too_large(answer: bytes, limit: int) -> None:
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"connection: close" in rest.lower()  # far over: not read to keep it alive
    assert b'"code": "too_large"' in rest
    assert f"larger than {limit} bytes".encode() in rest


@pytest.mark.parametrize("path", ["/limits/default", "/limits/stream"])
async def test_a_huge_declared_body_is_refused_before_reading(tmp_path: Path, path: str) -> None:
    async with limits_kernel(tmp_path) as kernel:
        app = CountingApp(kernel.asgi_app)
        async with serving(app) as port:
            # 800 MB announced, none sent: the answer comes anyway, and at once.
            assert_too_large(await exchange(port, head(path, 800_000_000)), CAP)
        assert app.received == 0


@pytest.mark.parametrize("path", ["/limits/default", "/limits/stream"])
async def test_a_chunked_body_is_cut_off_at_the_cap(tmp_path: Path, path: str) -> None:
    async with limits_kernel(tmp_path) as kernel:
        app = CountingApp(kernel.asgi_app)
        async with serving(app) as port:
            # 64 MiB offered without a length: refused once the cap is passed.
            assert_too_large(await exchange(port, head(path, None), body_chunks=1024), CAP)
        # The cap, plus at most what the server had buffered when the app asked
        # (one socket read and uvicorn's 64 KiB high-water mark): not the 64 MiB.
        assert CAP < app.received <= CAP + 1024 * 1024


async def test_bodies_within_the_cap_are_read_whole(tmp_path: Path) -> None:
    async with limits_kernel(tmp_path) as kernel:
        async with serving(kernel.asgi_app) as port:
            answer = await exchange(port, head("/limits/stream", None), body_chunks=1, chunk=CAP)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert answer.endswith(b'"data":%d}' % CAP)


async def test_each_route_may_set_its_own_limit(tmp_path: Path) -> None:
    async with limits_kernel(tmp_path) as kernel, client(kernel) as c:
        r = await c.post("/limits/small", content=b"x" * 2048)
        assert r.json()["data"] == 2048
        r = await c.post("/limits/small", content=b"x" * 2049)
        assert r.status_code == 413
        assert "connection" not in r.headers  # a little over: read to the end, kept alive
        assert r.json() == {
            "status": "error",
            "message": "request body larger than 2048 bytes",
            "code": "too_large",
        }
        # A limit read live: four times the setting.
        r = await c.post("/limits/live", content=b"x" * (3 * CAP))
        assert r.json()["data"] == 3 * CAP
        assert (await c.post("/limits/default", content=b"x" * (3 * CAP))).status_code == 413
        await kernel.update_settings(request_max_bytes=CAP // 4)
        assert (await c.post("/limits/live", content=b"x" * (3 * CAP))).status_code == 413


@contextlib.asynccontextmanager
async def client(kernel: Kernel) -> Any:
    transport = httpx.ASGITransport(app=kernel.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


@pytest.mark.parametrize(
    "host",
    [
        *("localhost", "localhost:6285", "LOCALHOST."),
        *("127.0.0.1", "127.0.0.1:80", "127.9.8.7", "[::1]", "[::1]:6285"),
    ],
)
async def test_loopback_hosts_are_served(tmp_path: Path, host: str) -> None:
    async with limits_kernel(tmp_path) as kernel, client(kernel) as c:
        r = await c.post("/limits/default", content=b"xy", headers={"Host": host})
        assert r.json() == {"status": "success", "data": 2}


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:6285", "localhost.evil.example", "10.0.0.1", "[::2]"]
)
async def test_other_hosts_get_421(tmp_path: Path, host: str) -> None:
    async with limits_kernel(tmp_path) as kernel, client(kernel) as c:
        for path in ("/limits/default", "/nowhere"):
            r = await c.post(path, content=b"xy", headers={"Host": host})
            assert r.status_code == 421
            body = r.json()
            assert body["code"] == "host_not_allowed"
            assert "allowed_hosts" in body["message"]


async def test_configured_hosts_and_the_served_address_are_served(tmp_path: Path) -> None:
    options = {"allowed_hosts": ("Bot.Example.com",), "host": "192.0.2.7"}
    async with limits_kernel(tmp_path, **options) as kernel, client(kernel) as c:
        for host in ("bot.example.com", "bot.example.com:443", "192.0.2.7:6285"):
            r = await c.post("/limits/default", content=b"xy", headers={"Host": host})
            assert r.status_code == 200, host
        r = await c.post("/limits/default", content=b"xy", headers={"Host": "other.example"})
        assert r.status_code == 421


async def test_a_star_allows_any_host(tmp_path: Path) -> None:
    async with limits_kernel(tmp_path, allowed_hosts=("*",)) as kernel, client(kernel) as c:
        r = await c.post("/limits/default", content=b"xy", headers={"Host": "any.example"})
        assert r.status_code == 200


async def test_a_websocket_to_another_host_is_closed(tmp_path: Path) -> None:
    async with limits_kernel(tmp_path) as kernel:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "websocket",
            "path": "/ws",
            "headers": [(b"host", b"evil.example")],
            "query_string": b"",
        }
        await kernel.asgi_app(scope, receive, send)
        assert sent == [{"type": "websocket.close", "code": 1008}]
