"""Two NekoBot bots inside one Starlette application.

Each bot is a Kernel with its own data directory; the host application mounts their
ASGI apps under `/cats` and `/dogs`, keeps `/` for itself, and runs the kernels for as
long as it runs. Start it with `python embed_app.py` (data goes to `./data`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from kernel import Kernel, KernelConfig

BOTS = ("cats", "dogs")


def create_app(data_root: Path, **options: Any) -> Starlette:
    """The host app; `options` are passed on to each bot's KernelConfig."""
    kernels = {
        bot: Kernel(
            KernelConfig(
                data_dir=data_root / bot,
                plugin_dirs=[data_root / bot / "plugins"],
                **options,
            )
        )
        for bot in BOTS
    }

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A kernel is entered and exited in one task: the host's lifespan task is that task.
        async with AsyncExitStack() as stack:
            for kernel in kernels.values():
                await stack.enter_async_context(kernel)
            yield

    async def index(request: Request) -> JSONResponse:
        bots = {
            bot: {"kernel": kernel.id, "running": kernel.running, "path": f"/{bot}"}
            for bot, kernel in kernels.items()
        }
        return JSONResponse({"bots": bots})

    routes: list[BaseRoute] = [Route("/", index)]
    routes += [Mount(f"/{bot}", app=kernel.asgi_app) for bot, kernel in kernels.items()]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.kernels = kernels
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(Path("data")), host="127.0.0.1", port=6285)
