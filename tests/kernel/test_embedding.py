"""Embedding: kernels inside another ASGI application, two of them in one process.

Runs docs/examples/embed_app.py (the example of docs/embedding.md) through its ASGI
lifespan, as a server would, and talks to both bots over HTTP and the mock platform.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from kernel import Kernel, KernelConfig, PluginState
from kernel.storage import Storage
from kernel.testing import MockBot

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "embed_app.py"
#: Test settings: only the builtins the test needs, nothing from the environment.
OPTIONS: Mapping[str, Any] = {
    "builtin_plugins": ("api", "help"),
    "entry_points": False,
    "hot_reload": False,
    "watchdog": False,
}


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nekobot_docs_embed_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Drive `app`'s ASGI lifespan as a server does: startup, then shutdown on exit."""
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](1)
    app_outbox, from_app = anyio.create_memory_object_stream[dict[str, Any]](1)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with to_app, app_inbox, app_outbox, from_app, anyio.create_task_group() as tg:
        tg.start_soon(app, scope, app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        try:
            yield
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"


async def health(http: httpx.AsyncClient, bot: str) -> dict[str, Any]:
    response = await http.get(f"/{bot}/api/health")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


@pytest.mark.anyio
async def test_two_kernels_embedded_in_one_app(tmp_path: Path) -> None:
    app = load_example().create_app(tmp_path, **OPTIONS)
    cats: Kernel = app.state.kernels["cats"]
    dogs: Kernel = app.state.kernels["dogs"]
    assert not cats.running and not dogs.running

    transport = httpx.ASGITransport(app=app)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://localhost") as http,
    ):
        assert cats.running and dogs.running
        index = (await http.get("/")).json()["bots"]
        assert index["cats"]["kernel"] == cats.id != dogs.id == index["dogs"]["kernel"]
        assert (await health(http, "cats"))["plugins"] == 2
        assert (await health(http, "dogs"))["plugins"] == 2

        cat_bot, dog_bot = MockBot(cats), MockBot(dogs)
        assert (await cat_bot.receive("/help"))[0].startswith("Commands:")
        assert (await dog_bot.receive("/help"))[0].startswith("Commands:")

        # What one bot's admin does stays with that bot.
        await dogs.plugins.disable("help")
        assert await dog_bot.receive("/help") == []
        assert (await cat_bot.receive("/help"))[0].startswith("Commands:")
        assert (await health(http, "cats"))["plugins"] == 2
        assert (await health(http, "dogs"))["plugins"] == 1
        # The host's paths are not the bots'.
        assert (await http.get("/birds/api/health")).status_code == 404
        assert (await http.get("/cats/nowhere")).json()["code"] == "not_found"

    assert not cats.running and not dogs.running
    # Each kernel wrote to its own data directory.
    for bot, help_enabled in (("cats", True), ("dogs", False)):
        assert (tmp_path / bot / "nekobot.db").is_file()
        async with Storage(tmp_path / bot / "nekobot.db") as storage:
            stored = await storage.state_items("plugins")
        assert stored.get("help", {"enabled": True})["enabled"] is help_enabled

    # A new host app on the same directories finds each bot as it was left.
    again = load_example().create_app(tmp_path, **OPTIONS)
    async with lifespan(again):
        cat_help = again.state.kernels["cats"].plugins.info("help")
        dog_help = again.state.kernels["dogs"].plugins.info("help")
        assert cat_help.enabled and cat_help.state is PluginState.ACTIVE
        assert not dog_help.enabled and dog_help.state is not PluginState.ACTIVE


@pytest.mark.anyio
async def test_kernel_app_acknowledges_lifespan_without_starting_the_kernel(
    tmp_path: Path,
) -> None:
    # Whoever serves `kernel.asgi_app` directly must enter the kernel itself.
    kernel = Kernel(KernelConfig(data_dir=tmp_path, plugin_dirs=(), **OPTIONS))
    async with lifespan(kernel.asgi_app):
        assert not kernel.running
    assert not (tmp_path / "nekobot.db").exists()

    async with kernel, lifespan(kernel.asgi_app):
        assert kernel.running
        transport = httpx.ASGITransport(app=kernel.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            assert (await http.get("/api/health")).status_code == 200
