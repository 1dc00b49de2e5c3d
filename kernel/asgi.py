"""The kernel's one ASGI app: a route table rebuilt from the registry, swapped whole.

Routes are private by default: unless a route says `public=True`, a request must carry
`scope["nekobot.principal"]`, which an authentication middleware (contributed by a
plugin through `nekobot_http_middleware`) sets. Without such a plugin nothing private
is reachable: the default is deny.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from kernel.lifecycle import GateClosedError
from kernel.registry import Entry

if TYPE_CHECKING:
    from kernel.generations import Generation
    from kernel.kernel import Kernel

PRINCIPAL = "nekobot.principal"
_REDISPATCH = "nekobot.redispatch"


def route_path(scope: Scope) -> str:
    """The request path below the app's mount point (`root_path`)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def error_response(status: int, message: str, code: str) -> Response:
    """A JSON error in the API's envelope."""
    body = json.dumps({"status": "error", "message": message, "code": code})
    return Response(body, status_code=status, media_type="application/json")


class _Endpoint:
    """Runs one plugin's endpoint inside its generation's gate."""

    def __init__(self, kernel: Kernel, owner: str, route: Any, gen: Generation) -> None:
        self.kernel = kernel
        self.owner = owner
        self.route = route
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.route.public and scope.get(PRINCIPAL) is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await error_response(401, "authentication required", "unauthorized")(
                scope, receive, send
            )
            return
        try:
            self.gen.gate.enter()
        except GateClosedError:
            await self._redispatch(scope, receive, send)
            return
        scope["nekobot.ctx"] = self.gen.ctx
        if scope["type"] == "websocket":
            self.gen.gate.leave()
            await self._websocket(scope, receive, send)
            return
        try:
            result = self.route.endpoint(Request(scope, receive, send))
            if inspect.isawaitable(result):
                result = await result
            await result(scope, receive, send)
        finally:
            self.gen.gate.leave()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A long-lived connection does not hold the gate (a reload would wait for it);
        it is cancelled, and closed with 1012, when its plugin generation is disposed."""
        plugin_scope = self.gen.scope
        if plugin_scope is None or plugin_scope.closed:
            await send({"type": "websocket.close", "code": 1012})
            return
        with anyio.CancelScope() as cancel:
            withdraw = plugin_scope.on_dispose(cancel.cancel, name="websocket connection")
            try:
                await self.route.endpoint(WebSocket(scope, receive, send))
            finally:
                withdraw()
        if cancel.cancelled_caught:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1012})

    async def _redispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The plugin is being swapped: wait, then route the request through the new table."""
        tries = scope.get(_REDISPATCH, 0)
        if tries >= 3:
            await error_response(503, f"plugin {self.owner!r} is changing; retry", "unavailable")(
                scope, receive, send
            )
            return
        await self.kernel.plugins.settled(self.owner)
        await self.kernel.asgi_app({**scope, _REDISPATCH: tries + 1}, receive, send)


class KernelApp:
    """The ASGI app of one Kernel; `rebuild()` swaps its route table atomically."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.routes: list[BaseRoute] = []
        self._app: ASGIApp = self._build()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        scope.setdefault("nekobot.kernel", self.kernel)
        await self._app(scope, receive, send)

    def rebuild(self) -> None:
        """Rebuild the middleware stack and route table from the registries."""
        self._app = self._build()

    def _build(self) -> ASGIApp:
        k = self.kernel
        seen: dict[int, Entry[Any]] = {}
        methods: dict[int, list[str]] = {}
        for entry in k.routes:
            (_, method), route = entry.item
            seen.setdefault(id(route), entry)
            methods.setdefault(id(route), []).append(method)
        routes: list[BaseRoute] = []
        for rid, entry in seen.items():
            _, route = entry.item
            endpoint = _Endpoint(k, entry.owner, route, entry.generation)  # type: ignore[arg-type]
            if route.websocket:
                routes.append(WebSocketRoute(route.path, endpoint, name=route.name))
            else:
                routes.append(Route(route.path, endpoint, methods=methods[rid], name=route.name))
        routes.sort(key=_route_order)
        self.routes = routes
        app: ASGIApp = _StaticFirstRouter(routes)
        middleware = sorted((e.item for e in k.middleware), key=lambda m: m.order, reverse=True)
        for spec in middleware:
            factory: Callable[[ASGIApp], ASGIApp] = spec.factory
            app = factory(app)
        return app


class _StaticFirstRouter:
    """A starlette Router that finds routes without path parameters by a dict lookup
    (the common case) before falling back to its linear scan."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        # No 307 to the path with(out) a trailing slash: a miss is the 404 envelope.
        self.router = Router(routes=routes, default=_not_found, redirect_slashes=False)
        self.static: dict[str, list[BaseRoute]] = {}
        for route in routes:
            path = getattr(route, "path", "")
            if "{" not in path:
                self.static.setdefault(path, []).append(route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        candidates = self.static.get(route_path(scope)) if scope["type"] != "lifespan" else None
        if candidates:
            scope.setdefault("router", self.router)
            partial = None
            for route in candidates:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await route.handle(scope, receive, send)
                    return
                if match is Match.PARTIAL and partial is None:
                    partial = (route, child)
            if partial is not None:  # e.g. the wrong method: the route answers 405
                scope.update(partial[1])
                await partial[0].handle(scope, receive, send)
                return
        await self.router(scope, receive, send)


def _route_order(route: BaseRoute) -> tuple[int, str]:
    path: str = getattr(route, "path", "")
    return (path.count("{"), path)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await error_response(404, f"no route {scope.get('path', '')!r}", "not_found")(
        scope, receive, send
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    """The kernel is entered by whoever embeds it; lifespan events are acknowledged."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
