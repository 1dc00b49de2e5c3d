"""A real NekoBot API server on a free loopback port, for the builtin plugins' tests."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import attrs
import httpx
import pytest
import uvicorn

from kernel import Kernel, KernelConfig
from kernel.server import uvicorn_config


@attrs.define
class ApiServer:
    """A running kernel served by uvicorn, with an admin token."""

    kernel: Kernel
    base_url: str
    token: str
    plugin_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        """The admin's Authorization header."""
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        """A client for this server (unauthenticated unless headers are passed)."""
        return httpx.AsyncClient(base_url=self.base_url, timeout=10.0, **kwargs)  # type: ignore[arg-type]

    def authed(self) -> httpx.AsyncClient:
        """A client that sends the admin token."""
        return self.client(headers=self.headers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def serve(
    kernel: Kernel, port: int, *, handoff: bool = True
) -> AsyncIterator[uvicorn.Server]:
    """Serve `kernel` as `nekobot run` does (`handoff=False`: with uvicorn's own WebSocket
    protocol, so that the hub serves `/ws` connections in-process)."""
    config = uvicorn_config(kernel.asgi_app, "127.0.0.1", port, log_level="warning", lifespan="off")
    if not handoff:
        config.ws = "websockets-sansio"
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers no event)
                await anyio.sleep(0.01)
        yield server
        server.should_exit = True


@asynccontextmanager
async def api_server(tmp_path: Path, *, handoff: bool = True) -> AsyncIterator[ApiServer]:
    """Every builtin plugin, a user plugin directory, served on 127.0.0.1:<free port>."""
    plugin_dir = tmp_path / "user_plugins"
    plugin_dir.mkdir()
    config = KernelConfig(
        data_dir=tmp_path / "data",
        plugin_dirs=(plugin_dir,),
        entry_points=False,
        hot_reload=False,
        watchdog=False,
    )
    async with Kernel(config) as kernel:
        port = free_port()
        # The admin token straight from the auth service: a login over HTTP costs two
        # scrypt runs (~0.1 s) per test; the tests of login itself log in themselves.
        token, _ = kernel.services.get("auth").issue("nekobot")
        async for _ in serve(kernel, port, handoff=handoff):
            yield ApiServer(kernel, f"http://127.0.0.1:{port}", token, plugin_dir)


#: Parametrize a test's `api` with these (`indirect=True`) to run it both ways: `/ws`
#: connections handed to the relay process, and served by the hub in-process.
WS_MODES = ("relay", "in_process")


@pytest.fixture
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ApiServer]:
    """Every builtin plugin, a user plugin directory, served on 127.0.0.1:<free port>."""
    mode = getattr(request, "param", "relay")
    async with api_server(tmp_path, handoff=mode == "relay") as server:
        yield server
