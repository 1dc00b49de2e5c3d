"""The essential HTTP API core. The admin API grows on top of it."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from builtin_plugins.api.cors import CORSMiddleware
from builtin_plugins.api.hub import Hub
from builtin_plugins.api.openapi import openapi_json
from builtin_plugins.api.ratelimit import RateLimiter, RateLimitMiddleware
from builtin_plugins.api.shapes import conflict_json, event_json, record_json
from builtin_plugins.api.web import ErrorMiddleware
from kernel import KernelEvent, MiddlewareSpec, PluginContext, RouteSpec, hookimpl
from kernel.protocols import WsHub
from kernel.version import __version__

provides = (WsHub, RateLimiter)


async def health(request: Request) -> JSONResponse:
    """`GET /api/health`: public liveness probe."""
    kernel = request.scope["nekobot.kernel"]
    return JSONResponse(
        {
            "status": "success",
            "data": {
                "status": "ok",
                "version": __version__,
                "plugins": sum(1 for p in kernel.plugins.infos() if p.state.value == "active"),
            },
        }
    )


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/openapi.json",
            openapi_json,
            name="openapi",
            summary="The OpenAPI 3.1 document of every route",
        ),
        RouteSpec(
            "/ws",
            websocket,
            websocket=True,
            public=True,
            name="ws",
            summary="WebSocket hub: logs, events and plugin channels",
        ),
        RouteSpec(
            "/api/health",
            health,
            methods=("GET",),
            public=True,
            name="health",
            summary="Liveness probe",
        ),
    ]


_CHANNEL_CHANGES = (
    "plugin.disabled",
    "plugin.deleted",
    "plugin.removed",
    "plugin.reloaded",
    "plugin.enabled",
)


async def websocket(ws: WebSocket) -> None:
    """`/ws`: the hub (it authenticates by header, `?token=` or a first `auth` frame)."""
    hub = ws.scope["nekobot.kernel"].services.current(WsHub)
    if not isinstance(hub, Hub):
        await ws.close(code=1013)
        return
    await hub.serve(ws)


@hookimpl
async def nekobot_plugin_start(ctx: PluginContext) -> None:
    ctx.provide(RateLimiter, RateLimiter())
    hub = Hub(ctx.kernel, ctx.start_task)
    ctx.provide(WsHub, hub)
    ctx.on_dispose(hub.aclose, name="ws relay")
    ctx.on_dispose(
        ctx.kernel.logging.buffer.subscribe(
            lambda record: hub.publish("logs", record_json(record))
        ),
        name="logs channel",
    )

    def on_event(event: KernelEvent) -> None:
        hub.publish("events", event_json(event))
        if event.type in _CHANNEL_CHANGES:
            hub.close_missing_channels()
        if event.type in ("plugin.enabled", "plugin.reloaded") and event.plugin:
            # The kernel reports a plugin's command conflicts with the operation; the
            # dashboard hears of them here, whoever enabled the plugin (API, hot reload).
            conflicts = ctx.kernel.plugins.conflicts_of(event.plugin)
            if conflicts:
                hub.publish(
                    "events",
                    event_json(
                        KernelEvent(
                            "command.conflicts",
                            {"conflicts": [conflict_json(c) for c in conflicts]},
                            plugin=event.plugin,
                        )
                    ),
                )

    ctx.subscribe_events(on_event)


@hookimpl
def nekobot_http_middleware() -> Iterable[MiddlewareSpec]:
    return [
        # Outermost: whatever goes wrong below becomes the error envelope, never a traceback.
        MiddlewareSpec("api-errors", ErrorMiddleware, order=-100),
        # Before rate limits and auth: a preflight carries no token.
        MiddlewareSpec("api-cors", CORSMiddleware, order=-90),
        MiddlewareSpec("api-ratelimit", RateLimitMiddleware, order=-50),
    ]
