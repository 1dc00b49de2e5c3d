"""Serving a kernel with uvicorn: the settings `nekobot run` uses, and a WebSocket protocol
that can hand an accepted connection to another process.

The hand-off exists for the `/ws` hub: writing 10,000 log records a second to a hundred
dashboards is mostly kernel time spent in `send()`, and it would be spent on the bot's
event loop. With the hand-off the bot authenticates the upgrade request as for any
route, then passes the socket (and the request, so the other side can answer the
handshake itself) to a relay process that owns the connection from then on.

The protocol advertises it as the ASGI extension `nekobot.websocket.handoff` in the
scope of each WebSocket connection it can hand off: `{"handoff": callable}`. Calling
`handoff(take)` before accepting gives up the connection: the server stops reading,
calls `take(fd, request)` with a duplicate of the socket's file descriptor (the callee
owns it and must close it) and the bytes of the HTTP upgrade request, then lets go of
its own descriptor without writing anything. If `take` raises, the descriptor is still
the server's (it closes it) and so is the connection: the app may accept it after all.
TLS connections, and platforms without descriptor passing, are not offered the
extension.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

if TYPE_CHECKING:
    import uvicorn

WEBSOCKET_HANDOFF = "nekobot.websocket.handoff"

#: `take(fd, request)`: receives the connection (see the module docstring).
Take = Callable[[int, bytes], None]

CAN_HAND_OFF = hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX")


class HandoffWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus the `nekobot.websocket.handoff`
    extension."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: dict[str, Any] | None = getattr(self, "scope", None)
        if (
            CAN_HAND_OFF
            and scope is not None
            and self.response.status_code == 101
            and self.scheme == "ws"
            and self.transport.get_extra_info("socket") is not None
        ):
            scope["extensions"][WEBSOCKET_HANDOFF] = {"handoff": self._handoff}

    def _handoff(self, take: Take) -> None:
        if self.handshake_complete or self.initial_response is not None or self.disconnected:
            raise RuntimeError("the connection can no longer be handed off")
        sock = self.transport.get_extra_info("socket")
        # Nothing more is read here: whatever the client sends next is the relay's.
        self.transport.pause_reading()
        fd = os.dup(sock.fileno())
        try:
            take(fd, self.request.serialize())
        except BaseException:
            os.close(fd)
            self.transport.resume_reading()
            raise
        # From here on this protocol writes nothing: the connection is someone else's.
        self.handshake_complete = True
        self.close_sent = True
        self.transport.abort()  # closes this process's descriptor only; the duplicate lives


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    lifespan: str = "on",
    **overrides: Any,
) -> uvicorn.Config:
    """The uvicorn settings a kernel is served with (`nekobot run`, the tests' real
    servers, the benchmarks): asyncio loop, the hand-off WebSocket protocol."""
    import uvicorn

    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "asyncio",
        "ws": HandoffWebSocketProtocol,
        "lifespan": lifespan,
        "log_level": log_level,
        **overrides,
    }
    return uvicorn.Config(app, **options)
