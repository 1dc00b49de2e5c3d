"""The uvicorn settings and the WebSocket hand-off extension, over a real server."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from kernel.config import KernelConfig
from kernel.server import WEBSOCKET_HANDOFF, connection_limit
from kernel.testing import PATIENCE, serving

pytestmark = pytest.mark.anyio


def upgrade_request(path: str = "/ws?x=1") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer abc\r\n\r\n"
    ).encode()


async def test_a_handed_off_connection_is_the_takers_alone() -> None:
    taken: dict[str, Any] = {}
    done = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"

        def take(fd: int, request: bytes) -> None:
            taken.update(fd=fd, request=request)

        scope["extensions"][WEBSOCKET_HANDOFF]["handoff"](take)
        done.set()

    async with serving(app) as port:
        client = socket.create_connection(("127.0.0.1", port))
        with client:
            client.sendall(upgrade_request())
            with anyio.fail_after(PATIENCE):
                await done.wait()
            # The server wrote nothing before it let go (no 101, no 500, no close), and
            # it cannot write after: the hand-off closed its descriptor. What it wrote
            # on loopback would be here by now; the 101 read below must be the first.
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(1024)
            # The taker has the connection: it answers the handshake from the request.
            ours = socket.socket(fileno=taken["fd"])
            with ours:
                proto = ServerProtocol()
                proto.receive_data(taken["request"])
                (request,) = proto.events_received()
                assert request.path == "/ws?x=1"
                assert request.headers["Authorization"] == "Bearer abc"
                proto.send_response(proto.accept(request))
                ours.sendall(b"".join(proto.data_to_send()))
                client.setblocking(True)
                client.settimeout(PATIENCE)
                answer = await anyio.to_thread.run_sync(client.recv, 1024)
                assert answer.startswith(b"HTTP/1.1 101"), answer
                # The client's frames reach the taker, not uvicorn.
                frame = Frame(Opcode.TEXT, b"hello").serialize(mask=True)
                client.sendall(frame)
                ours.settimeout(PATIENCE)
                proto.receive_data(await anyio.to_thread.run_sync(ours.recv, 1024))
                (received,) = proto.events_received()
                assert received.data == b"hello"


async def test_handing_off_after_accepting_is_refused() -> None:
    errors: list[BaseException] = []
    tried = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        try:
            scope["extensions"][WEBSOCKET_HANDOFF]["handoff"](lambda fd, request: None)
        except RuntimeError as exc:
            errors.append(exc)
        tried.set()
        await send({"type": "websocket.close", "code": 1000})

    async with serving(app) as port:
        client = socket.create_connection(("127.0.0.1", port))
        with client:
            client.settimeout(PATIENCE)
            client.sendall(upgrade_request())
            answer = await anyio.to_thread.run_sync(client.recv, 1024)
            assert answer.startswith(b"HTTP/1.1 101"), answer
            with anyio.fail_after(PATIENCE):
                await tried.wait()
    assert "no longer" in str(errors[0])


async def test_plain_uvicorn_protocols_offer_no_handoff() -> None:
    seen: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        seen.append(WEBSOCKET_HANDOFF in scope.get("extensions", {}))
        await send({"type": "websocket.close", "code": 1000})

    async with serving(app, handoff=False) as port:
        client = socket.create_connection(("127.0.0.1", port))
        with client:
            client.settimeout(PATIENCE)
            client.sendall(upgrade_request())
            await anyio.to_thread.run_sync(client.recv, 1024)
    assert seen == [False]


async def test_a_taker_that_raises_leaves_the_connection_to_the_server() -> None:
    given: list[tuple[int, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

        def take(fd: int, request: bytes) -> None:
            given.append((fd, os.fstat(fd).st_ino))
            raise RuntimeError("not today")

        with pytest.raises(RuntimeError):
            scope["extensions"][WEBSOCKET_HANDOFF]["handoff"](take)
        await send({"type": "websocket.accept"})  # still the server's connection
        await send({"type": "websocket.close", "code": 1000})

    async with serving(app) as port:
        client = socket.create_connection(("127.0.0.1", port))
        with client:
            client.settimeout(PATIENCE)
            client.sendall(upgrade_request())
            answer = await anyio.to_thread.run_sync(client.recv, 1024)
            assert answer.startswith(b"HTTP/1.1 101"), answer
    ((fd, inode),) = given
    # The server closed the duplicate (the number may have been reused since).
    with contextlib.suppress(OSError):
        assert os.fstat(fd).st_ino != inode


async def health(scope: Any, receive: Any, send: Any) -> None:
    """A minimal app: 200 "ok" for every request."""
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


HALF_SENT = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1"


async def half_sent(port: int) -> anyio.abc.SocketStream:
    """A connection whose request headers never end."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(HALF_SENT)
    return stream


async def closed_by_server(stream: anyio.abc.SocketStream) -> None:
    """Return once the server has closed `stream` (it writes nothing before)."""
    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
        data = await stream.receive()
        pytest.fail(f"the server wrote {data!r}")


async def test_half_sent_requests_are_closed_after_the_header_deadline() -> None:
    config = KernelConfig(header_timeout=1.0)
    async with serving(health, config=config) as port:
        slow = [await half_sent(port) for _ in range(200)]
        try:
            # 200 connections in the middle of their headers do not stop anyone else.
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(f"http://127.0.0.1:{port}/api/health")
            assert r.status_code == 200
            # Each is closed once its deadline has passed (generous bound: a loaded machine).
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for stream in slow:
                        tg.start_soon(closed_by_server, stream)
        finally:
            for stream in slow:
                await stream.aclose()


async def test_headers_sent_in_time_are_served_and_the_next_request_gets_a_deadline() -> None:
    config = KernelConfig(header_timeout=1.0)
    async with serving(health, config=config) as port:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            with anyio.fail_after(10):
                while not answer.endswith(b"ok"):
                    answer += await stream.receive()
            assert answer.startswith(b"HTTP/1.1 200")
            # Kept alive, and half of a second request: closed by the deadline.
            await stream.send(HALF_SENT)
            with anyio.fail_after(30):
                await closed_by_server(stream)


async def test_a_connection_idle_after_a_body_read_past_its_answer_gets_a_deadline() -> None:
    config = KernelConfig(header_timeout=1.0)
    async with serving(health, config=config) as port:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            # Answered without reading the body (as a 413 is): the server reads the rest
            # after the response, and then waits for the next request's headers.
            await stream.send(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
            )
            answer = b""
            with anyio.fail_after(10):
                while not answer.endswith(b"ok"):
                    answer += await stream.receive()
            await stream.send(b"x" * 100_000)
            with anyio.fail_after(30):
                await closed_by_server(stream)


async def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    # A long header deadline: only the connection limit can close anything here.
    config = KernelConfig(header_timeout=600, max_connections=20)
    async with serving(health, config=config) as port:
        held = [await half_sent(port) for _ in range(20)]
        try:
            extra = await half_sent(port)
            async with extra:
                with anyio.fail_after(30):
                    await closed_by_server(extra)
        finally:
            for stream in held:
                await stream.aclose()
        # Once they are gone, new connections are served again.
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(30):
                while True:
                    try:
                        r = await client.get(f"http://127.0.0.1:{port}/")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)  # the server has not seen the closes yet
        assert r.status_code == 200


def test_the_connection_limit_fits_the_descriptor_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_limit(10) == min(10, max(1, soft - 64))
    if soft != resource.RLIM_INFINITY:
        assert connection_limit(soft * 2) < soft
