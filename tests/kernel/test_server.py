"""The uvicorn settings and the WebSocket hand-off extension, over a real server."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
from typing import Any

import anyio
import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from kernel.server import WEBSOCKET_HANDOFF
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
