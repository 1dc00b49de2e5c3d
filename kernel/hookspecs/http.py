"""HTTP hooks: routes, middleware and WebSocket channels of the one ASGI app."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.hookspecs.markers import hookspec
from kernel.models import ChannelSpec, MiddlewareSpec, RouteSpec


@hookspec
def nekobot_routes() -> Iterable[RouteSpec]:
    """Return the HTTP (and WebSocket) routes the plugin serves.

    Contribution hook: sync, pure, called once per load. A path and method another
    plugin serves is a load error. Routes are private unless `public=True`: the app
    answers 401 to a request no authentication middleware has vouched for. The route
    table is rebuilt and swapped atomically when the plugin comes or goes; requests in
    flight finish before the plugin is disposed.
    """


@hookspec
def nekobot_http_middleware() -> Iterable[MiddlewareSpec]:
    """Return ASGI middleware to wrap around the kernel's app (lower `order` is outer).

    Contribution hook: sync, pure, called once per load. Authentication is such a
    middleware: it sets `scope["nekobot.principal"]` for a request it accepts.
    """


@hookspec
def nekobot_ws_channels() -> Iterable[ChannelSpec]:
    """Return the WebSocket channels the plugin publishes on the `/ws` hub.

    Contribution hook: sync, pure, called once per load. A channel name another plugin
    holds is a load error. When the plugin goes away its subscribers are told and the
    channel is closed.
    """
