"""The kernel's one ASGI app: a route table rebuilt from the registry, swapped whole.

Routes are private by default: unless a route says `public=True`, a request must carry
`scope["nekobot.principal"]`, which an authentication middleware (contributed by a
plugin through `nekobot_http_middleware`) sets. Without such a plugin nothing private
is reachable: the default is deny.

Before any plugin code, the `Host` of a request and the size of its body are checked
(see `kernel.limits`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from kernel.lifecycle import Gate, GateCall, GateClosedError
from kernel.limits import (
    AllowedHosts,
    CappedReceive,
    content_length,
    error_response,
    misdirected,
    only_too_large,
    too_large_response,
)
from kernel.registry import Entry

if TYPE_CHECKING:
    from kernel.generations import Generation
    from kernel.kernel import Kernel

PRINCIPAL = "nekobot.principal"
_REDISPATCH = "nekobot.redispatch"
#: The gates a request holds because it is inside those generations' middleware.
_HELD = "nekobot.held_gates"
#: The one cancel scope every gate call of an HTTP request runs in (see `Gate.enter`),
#: and the plugin whose retirement cancelled it.
_REQUEST_CANCEL = "nekobot.request_cancel_scope"
_CANCELLED_BY = "nekobot.cancelled_by"


def route_path(scope: Scope) -> str:
    """The request path below the app's mount point (`root_path`)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class _Endpoint:
    """Runs one plugin's endpoint inside its generation's gate."""

    def __init__(self, kernel: Kernel, owner: str, route: Any, gen: Generation) -> None:
        self.kernel = kernel
        self.owner = owner
        self.route = route
        self.gen = gen
        self.label = f"request {route.path!r}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.route.public and scope.get(PRINCIPAL) is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await error_response(401, "authentication required", "unauthorized")(
                scope, receive, send
            )
            return
        gate = self.gen.gate
        # Inside the plugin's middleware already, the request holds its gate: it is served
        # by this generation even if it began retiring meanwhile (which waits for it).
        held = gate in scope.get(_HELD, ())
        shared = scope.get(_REQUEST_CANCEL)
        call = None
        if not held:
            try:
                call = gate.enter(self.label, shared)
            except GateClosedError:
                await self._redispatch(scope, receive, send)
                return
        scope["nekobot.ctx"] = self.gen.ctx
        if scope["type"] == "websocket":
            if call is not None:
                gate.leave(call)
            await self._websocket(scope, receive, send)
            return
        if call is None:
            await self._respond(scope, receive, send)
            return
        if shared is not None:  # already running in it: the middleware wrapper answers 503
            try:
                await self._respond(scope, receive, send)
            finally:
                gate.leave(call)
                if call.cancelled:
                    scope[_CANCELLED_BY] = self.owner
            return
        tracked = _TrackedSend(send)
        try:
            with call.cancel_scope:
                await self._respond(scope, receive, tracked)
        finally:
            gate.leave(call)
        if call.cancel_scope.cancelled_caught:
            await _unavailable(self.owner, scope, receive, tracked)

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._body_limit()
        declared = content_length(scope)
        if declared is not None and declared > limit:  # refused before reading a byte
            await too_large_response(limit, declared)(scope, receive, send)
            return
        capped = CappedReceive(receive, limit)
        tracked = send if isinstance(send, _TrackedSend) else _TrackedSend(send)
        try:
            result = self.route.endpoint(Request(scope, capped, tracked))
            if inspect.isawaitable(result):
                result = await result
            await result(scope, capped, tracked)
        except BaseException as exc:
            # Answered here, not by whatever error middleware a plugin adds: the cap is
            # the kernel's, and holds without any plugin.
            if only_too_large(exc) is None or tracked.started:
                raise
            await too_large_response(limit, declared)(scope, receive, tracked)

    def _body_limit(self) -> int:
        limit = self.route.body_limit
        if limit is None:
            return int(self.kernel.settings.request_max_bytes)
        return limit if isinstance(limit, int) else int(limit(self.kernel))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A long-lived connection does not hold the gate (a reload would wait for it);
        it is cancelled, and closed with 1012, when its plugin generation is disposed."""
        await _until_disposed(
            (self.gen,), lambda: self.route.endpoint(WebSocket(scope, receive, send)), send
        )

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


class _TrackedSend:
    """A `send` that remembers whether the response has started."""

    __slots__ = ("send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


async def _unavailable(owner: str, scope: Scope, receive: Receive, send: _TrackedSend) -> None:
    """Answer a request whose plugin was retired under it (and that outlived the wait):
    503 if nothing was sent yet; a response already started is left cut short."""
    if not send.started:
        await error_response(
            503, f"plugin {owner!r} was stopped while handling the request; retry", "unavailable"
        )(scope, receive, send)


async def _until_disposed(
    gens: Iterable[Generation], run: Callable[[], Awaitable[None]], send: Send
) -> None:
    """Run a WebSocket connection until it ends or one of `gens` is disposed (then close
    it with 1012: the client may reconnect to whatever serves next)."""
    scopes = [g.scope for g in gens]
    if any(s is None or s.closed for s in scopes):
        await send({"type": "websocket.close", "code": 1012})
        return
    with anyio.CancelScope() as cancel:
        withdraws = [s.on_dispose(cancel.cancel, name="websocket connection") for s in scopes if s]
        try:
            await run()
        finally:
            for withdraw in withdraws:
                withdraw()
    if cancel.cancelled_caught:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1012})


@attrs.frozen
class _Stack:
    """A built app and the plugin generations whose middleware it runs."""

    app: ASGIApp
    gens: tuple[tuple[str, Generation], ...] = ()


class KernelApp:
    """The ASGI app of one Kernel; `rebuild()` swaps its route table atomically.

    A request holds the gate of every plugin generation whose middleware it passes, for
    as long as it runs (it is inside that middleware): retiring such a generation waits
    for it, and a request that meets a retiring one waits until the plugin's operation
    has settled and starts again through the new stack.
    """

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.routes: list[BaseRoute] = []
        self._hosts = AllowedHosts(kernel.config.host, kernel.config.allowed_hosts)
        self._stack = self._build()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        host = self._hosts.refused(scope)
        if host is not None:
            await misdirected(host, scope, receive, send)
            return
        scope.setdefault("nekobot.kernel", self.kernel)
        stack = self._stack
        if not stack.gens:
            await stack.app(scope, receive, send)
            return
        await self._through_middleware(stack, scope, receive, send)

    def rebuild(self) -> None:
        """Rebuild the middleware stack and route table from the registries."""
        self._stack = self._build()

    async def _through_middleware(
        self, stack: _Stack, scope: Scope, receive: Receive, send: Send
    ) -> None:
        def label() -> str:
            return f"request {scope.get('method', 'WS')} {route_path(scope)!r} (middleware)"

        # A request routed again (see `_Endpoint._redispatch`) is inside some already.
        held: frozenset[Gate] = scope.get(_HELD, frozenset())
        # One cancel scope for every plugin the request passes: cheaper than one each, and
        # a request cancelled by one plugin's retirement cannot go on in the others anyway.
        shared = anyio.CancelScope()
        for tries in range(4):
            calls: list[tuple[str, GateCall]] = []
            closed = None
            for owner, gen in stack.gens:
                if gen.gate in held:
                    continue
                try:
                    calls.append((owner, gen.gate.enter(label, shared)))
                except GateClosedError:
                    closed = owner
                    break
            if closed is None:
                break
            for _, call in reversed(calls):
                call.gate.leave(call)
            if tries == 3:  # as many tries as a route's endpoint gets
                await error_response(503, f"plugin {closed!r} is changing; retry", "unavailable")(
                    scope, receive, send
                )
                return
            await self.kernel.plugins.settled(closed)
            stack = self._stack
            if not stack.gens:
                await stack.app(scope, receive, send)
                return
        if scope["type"] == "websocket":
            for _, call in calls:
                call.gate.leave(call)
            app = stack.app
            await _until_disposed(
                [g for _, g in stack.gens], lambda: app(scope, receive, send), send
            )
            return
        scope[_HELD] = held | {call.gate for _, call in calls}
        scope[_REQUEST_CANCEL] = shared
        tracked = _TrackedSend(send)
        try:
            with shared:
                await stack.app(scope, receive, tracked)
        finally:
            for _, call in reversed(calls):
                call.gate.leave(call)
        if shared.cancelled_caught:
            owner = next((o for o, c in calls if c.cancelled), scope.get(_CANCELLED_BY, "?"))
            await _unavailable(owner, scope, receive, tracked)

    def _build(self) -> _Stack:
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
        entries = sorted(k.middleware, key=lambda e: e.item.order, reverse=True)
        gens: dict[int, tuple[str, Generation]] = {}
        for entry in entries:
            factory: Callable[[ASGIApp], ASGIApp] = entry.item.factory
            app = factory(app)
            gen: Generation = entry.generation  # type: ignore[assignment]
            gens.setdefault(id(gen), (entry.owner, gen))
        return _Stack(app, tuple(gens.values()))


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
