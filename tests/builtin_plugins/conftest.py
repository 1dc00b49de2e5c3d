"""A real NekoBot API server on a free loopback port, for the builtin plugins' tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest

from builtin_plugins.api.hub import Hub
from kernel import Kernel, KernelConfig
from kernel.protocols import AuthService, WsHub
from kernel.testing import PATIENCE, serving


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
        return httpx.AsyncClient(base_url=self.base_url, timeout=PATIENCE, **kwargs)  # type: ignore[arg-type]

    def authed(self) -> httpx.AsyncClient:
        """A client that sends the admin token."""
        return self.client(headers=self.headers)

    def ws_url(self, query: str = "") -> str:
        """The URL of the `/ws` hub (`query`: e.g. `?token=...`)."""
        return self.base_url.replace("http://", "ws://") + "/ws" + query

    @property
    def hub(self) -> Hub:
        """The `/ws` hub the `api` plugin provides."""
        hub = self.kernel.services.current(WsHub)
        assert isinstance(hub, Hub)
        return hub


@asynccontextmanager
async def api_server(
    tmp_path: Path, *, handoff: bool = True, **options: object
) -> AsyncIterator[ApiServer]:
    """Every builtin plugin, a user plugin directory, served on 127.0.0.1:<free port>;
    `options` are more `KernelConfig` fields."""
    plugin_dir = tmp_path / "user_plugins"
    plugin_dir.mkdir()
    # The log streaming tests make floods of one message on purpose, to load the fan-out;
    # collapsing floods is tested by itself (tests/kernel/test_logs.py).
    options.setdefault("log_repeat_limit", 1_000_000)
    config = KernelConfig(
        data_dir=tmp_path / "data",
        plugin_dirs=(plugin_dir,),
        entry_points=False,
        hot_reload=False,
        watchdog=False,
        **options,  # type: ignore[arg-type]
    )
    async with Kernel(config) as kernel:
        # The admin token straight from the auth service: a login over HTTP costs two
        # scrypt runs (~0.1 s) per test; the tests of login itself log in themselves.
        token, _ = kernel.services.current(AuthService).issue("nekobot")
        async with serving(kernel.asgi_app, handoff=handoff) as port:
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
