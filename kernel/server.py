"""Serving a kernel with uvicorn: the settings `nekobot run` uses, an HTTP protocol that
bounds how long headers may take and how many connections are open, and a WebSocket
protocol that can hand an accepted connection to another process.

uvicorn has no deadline for a request's headers (its keep-alive timeout starts only
after a response) and no bound on open connections (`limit_concurrency` answers 503 only
to requests whose headers have arrived): a client sending headers one byte at a time on
thousands of connections exhausts the process's file descriptors. `BoundedH11Protocol`
closes a connection whose headers are not complete `header_timeout` seconds after it
opened (or after the previous response), and closes at once a connection accepted while
`max_connections` are open.

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

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from kernel.config import KernelConfig

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("nekobot.server")

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


#: File descriptors kept free of connections (the database, log files, pipes, plugins).
_RESERVED_FDS = 64


def connection_limit(configured: int) -> int:
    """`configured`, lowered to fit the process's file-descriptor limit: a connection
    refused for lack of descriptors fails the accept loop itself (and logs each time)."""
    try:
        import resource
    except ImportError:  # not on Unix: no limit to read
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - _RESERVED_FDS))


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and a bound on
    the connections open at once (see the module docstring)."""

    #: Set per server by `uvicorn_config` (a subclass each: the protocol is built by
    #: uvicorn from the class alone).
    header_timeout: float = KernelConfig().header_timeout
    max_connections: int = KernelConfig().max_connections

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning(
                "refused a connection from %s: %d connections are open already",
                self.client[0] if self.client else "?",
                self.max_connections,
            )
            transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # Upgraded to a WebSocket, or headers complete (the request is being served).
        if self.transport.get_protocol() is not self or self.conn.their_state is not h11.IDLE:
            self._disarm()
        elif self._deadline is None and not self.transport.is_closing():
            # Between requests without a deadline: the body of a request answered early
            # (a 413) was read to its end after the response. A deadline that is set
            # already is kept: bytes trickling in do not extend it.
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's headers get a deadline of their own

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # No response: h11 cannot answer a request it has not read.
            self.transport.close()


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    lifespan: str = "on",
    config: KernelConfig | None = None,
    **overrides: Any,
) -> uvicorn.Config:
    """The uvicorn settings a kernel is served with (`nekobot run`, the tests' real
    servers, the benchmarks): asyncio loop, the bounded HTTP protocol, the hand-off
    WebSocket protocol, forwarded headers believed only from `trusted_proxies`.

    The limits come from `config`; by default from the configuration of the kernel
    whose app `app` is (or the defaults, for another app)."""
    import uvicorn

    if config is None:
        kernel = getattr(app, "kernel", None)
        config = getattr(kernel, "config", None)
        if not isinstance(config, KernelConfig):
            config = KernelConfig()
    http = type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {
            "header_timeout": config.header_timeout,
            "max_connections": connection_limit(config.max_connections),
        },
    )
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "asyncio",
        "http": http,
        "ws": HandoffWebSocketProtocol,
        "lifespan": lifespan,
        "log_level": log_level,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: any local
        # process (or a proxy passing the header through) could pick its client address.
        "proxy_headers": bool(config.trusted_proxies),
        "forwarded_allow_ips": list(config.trusted_proxies),
        **overrides,
    }
    return uvicorn.Config(app, **options)
