"""The essential HTTP API core. The admin API grows on top of it."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse

from builtin_plugins.api.web import ErrorMiddleware
from kernel import MiddlewareSpec, RouteSpec, hookimpl
from kernel.version import __version__


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
            "/api/health",
            health,
            methods=("GET",),
            public=True,
            name="health",
            summary="Liveness probe",
        )
    ]


@hookimpl
def nekobot_http_middleware() -> Iterable[MiddlewareSpec]:
    # Outermost: whatever goes wrong below becomes the error envelope, never a traceback.
    return [MiddlewareSpec("api-errors", ErrorMiddleware, order=-100)]
