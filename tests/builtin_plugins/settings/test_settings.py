"""`GET/PUT /api/bot/config` and `/api/settings` over a real server: partial merges,
validation naming the field, nothing half-applied, and persistence across a restart."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kernel import Kernel, KernelConfig
from kernel.testing import MockBot, serving
from tests.builtin_plugins.conftest import ApiServer

pytestmark = pytest.mark.anyio


def assert_error(r: httpx.Response, status: int, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    body = r.json()
    assert body["status"] == "error" and body["message"] and body["code"]
    if field is not None:
        assert body.get("details", {}).get("field") == field, body


@asynccontextmanager
async def server_on(data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A kernel on `data_dir` served on a free port, and an authenticated client."""
    config = KernelConfig(data_dir=data_dir, entry_points=False, hot_reload=False, watchdog=False)
    async with (
        Kernel(config) as kernel,
        serving(kernel.asgi_app) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c,
    ):
        r = await c.post("/api/login", json={"username": "nekobot", "password": "nekobot"})
        c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        yield c


BAD_BOT_CONFIG: list[tuple[dict[str, Any], str]] = [
    ({"command_prefixes": []}, "command_prefixes"),
    ({"command_prefixes": "!"}, "command_prefixes"),
    ({"command_prefixes": [""]}, "command_prefixes.0"),
    ({"command_prefixes": ["!", 3]}, "command_prefixes.1"),
    ({"wake_words": None}, "wake_words"),
    ({"admin_ids": [{"id": 1}]}, "admin_ids.0"),
    ({"llm_reply_mode": "sometimes"}, "llm_reply_mode"),
    ({"default_provider": 12}, "default_provider"),
    ({"default_personality": "x" * 200}, "default_personality"),
    ({"no_such_field": 1}, "no_such_field"),
    # One valid change next to an invalid one: nothing is applied.
    ({"wake_words": ["neko"], "llm_reply_mode": 1}, "llm_reply_mode"),
]

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"rate_limit_per_minute": 0}, "rate_limit_per_minute"),
    ({"rate_limit_per_minute": "10"}, "rate_limit_per_minute"),
    ({"rate_limit_per_minute": True}, "rate_limit_per_minute"),
    ({"rate_limit_per_minute": 1.5}, "rate_limit_per_minute"),
    ({"token_ttl_seconds": 10}, "token_ttl_seconds"),
    ({"cors_origins": ["not a url"]}, "cors_origins.0"),
    ({"cors_origins": "https://a.example"}, "cors_origins"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"hot_reload": "yes"}, "hot_reload"),
    ({"guest_webchat": 1}, "guest_webchat"),
    ({"upload_max_bytes": 10}, "upload_max_bytes"),
    ({"ui": []}, "ui"),
    ({"login_max_failures": 0}, "login_max_failures"),
    ({"restart_required": []}, "restart_required"),
    ({"log_level": "DEBUG", "hot_reload": None}, "hot_reload"),
]


async def test_bot_config_get_and_partial_put(api: ApiServer) -> None:
    async with api.authed() as c:
        before = (await c.get("/api/bot/config")).json()["data"]
        assert before["command_prefixes"] == ["/"]
        assert set(before) == {
            "command_prefixes",
            "wake_words",
            "admin_ids",
            "llm_reply_mode",
            "default_provider",
            "default_personality",
        }
        r = await c.put("/api/bot/config", json={"wake_words": ["neko", "cat"]})
        assert r.status_code == 200, r.text
        after = r.json()["data"]
        assert after == {**before, "wake_words": ["neko", "cat"]}
        r = await c.put("/api/bot/config", json={"llm_reply_mode": "always"})
        # The earlier change is kept: a PUT merges, it does not replace.
        assert r.json()["data"] == {**after, "llm_reply_mode": "always"}
        assert (await c.get("/api/bot/config")).json()["data"] == r.json()["data"]
        r = await c.put("/api/bot/config", json={"default_provider": "openai"})
        assert r.json()["data"]["default_provider"] == "openai"
        r = await c.put("/api/bot/config", json={"default_provider": None})
        assert r.json()["data"]["default_provider"] is None
        # An empty object changes nothing.
        same = await c.put("/api/bot/config", json={})
        assert same.json()["data"] == (await c.get("/api/bot/config")).json()["data"]
    assert api.kernel.bot_config.llm_reply_mode == "always"


async def test_bot_config_applies_live_to_the_pipeline(api: ApiServer) -> None:
    bot = MockBot(api.kernel)
    assert (await bot.receive("/help help"))[0].startswith("/help")
    async with api.authed() as c:
        r = await c.put("/api/bot/config", json={"command_prefixes": ["!"]})
        assert r.status_code == 200
    assert await bot.receive("/help") == []
    replies = await bot.receive("!help help")
    assert replies and replies[0].startswith("!help")


async def test_invalid_bot_config_changes_nothing(api: ApiServer) -> None:
    async with api.authed() as c:
        await c.put("/api/bot/config", json={"admin_ids": ["mock:1"]})
        before = (await c.get("/api/bot/config")).json()["data"]
        stored = await api.kernel.storage.state_get("kernel", "bot_config", None)
        for body, field in BAD_BOT_CONFIG:
            assert_error(await c.put("/api/bot/config", json=body), 400, field)
            assert (await c.get("/api/bot/config")).json()["data"] == before, body
        assert await api.kernel.storage.state_get("kernel", "bot_config", None) == stored


async def test_settings_get_and_partial_put(api: ApiServer) -> None:
    async with api.authed() as c:
        before = (await c.get("/api/settings")).json()["data"]
        assert before["rate_limit_per_minute"] == 600
        assert before["hot_reload"] is False  # the fixture's kernel runs without it
        assert "jwt" not in str(before).lower()
        r = await c.put(
            "/api/settings", json={"cors_origins": ["https://admin.example"], "ui": {"theme": 1}}
        )
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data.pop("restart_required") == []
        assert data == {**before, "cors_origins": ["https://admin.example"], "ui": {"theme": 1}}
        r = await c.put("/api/settings", json={"log_level": "WARNING"})
        data = r.json()["data"]
        assert data["cors_origins"] == ["https://admin.example"]  # kept
        assert data["log_level"] == "WARNING"
    # Applied live.
    assert logging.getLogger("nekobot").level == logging.WARNING
    async with api.authed() as c:
        await c.put("/api/settings", json={"log_level": "INFO"})
    assert logging.getLogger("nekobot").level == logging.INFO


async def test_invalid_settings_change_nothing(api: ApiServer) -> None:
    async with api.authed() as c:
        await c.put("/api/settings", json={"login_window_seconds": 120})
        before = (await c.get("/api/settings")).json()["data"]
        stored = await api.kernel.storage.state_get("kernel", "settings", None)
        for body, field in BAD_SETTINGS:
            assert_error(await c.put("/api/settings", json=body), 400, field)
            assert (await c.get("/api/settings")).json()["data"] == before, body
        assert await api.kernel.storage.state_get("kernel", "settings", None) == stored
    assert api.kernel.settings.login_window_seconds == 120


async def test_hot_reload_setting_starts_and_stops_the_watcher(api: ApiServer) -> None:
    assert api.kernel._reloader is None
    async with api.authed() as c:
        r = await c.put("/api/settings", json={"hot_reload": True})
        assert r.status_code == 200
        assert api.kernel._reloader is not None
        r = await c.put("/api/settings", json={"hot_reload": False})
        assert r.status_code == 200
    assert api.kernel._reloader is None


async def test_stored_state_survives_a_restart_and_failed_writes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with server_on(data_dir) as c:
        assert (await c.put("/api/bot/config", json={"wake_words": ["neko"]})).status_code == 200
        assert (await c.put("/api/settings", json={"token_ttl_seconds": 3600})).status_code == 200
        bot = (await c.get("/api/bot/config")).json()["data"]
        settings = (await c.get("/api/settings")).json()["data"]
        assert_error(await c.put("/api/bot/config", json={"wake_words": [1]}), 400, "wake_words.0")
        assert_error(await c.put("/api/settings", json={"token_ttl_seconds": -1}), 400)
    async with server_on(data_dir) as c:
        assert (await c.get("/api/bot/config")).json()["data"] == bot
        assert (await c.get("/api/settings")).json()["data"] == settings
        # The new lifetime is in force after the restart.
        r = await c.post("/api/login", json={"username": "nekobot", "password": "nekobot"})
        assert r.json()["data"]["expires_in"] == 3600


async def test_settings_endpoints_require_a_token(api: ApiServer) -> None:
    async with api.client() as c:
        for method in ("GET", "PUT"):
            for path in ("/api/settings", "/api/bot/config"):
                r = await c.request(method, path, json={})
                assert_error(r, 401)


async def test_concurrent_partial_puts_lose_nothing(api: ApiServer) -> None:
    changes: list[tuple[str, dict[str, Any]]] = [
        ("/api/bot/config", {"wake_words": ["neko"]}),
        ("/api/bot/config", {"admin_ids": ["mock:1"]}),
        ("/api/bot/config", {"llm_reply_mode": "always"}),
        ("/api/bot/config", {"default_provider": "p1"}),
        ("/api/bot/config", {"default_personality": "cat"}),
        ("/api/settings", {"token_ttl_seconds": 3600}),
        ("/api/settings", {"login_window_seconds": 60}),
        ("/api/settings", {"guest_webchat": True}),
        ("/api/settings", {"ui": {"theme": "dark"}}),
        ("/api/settings", {"cors_origins": ["https://a.example"]}),
    ]
    async with api.authed() as c:

        async def put(path: str, body: dict[str, Any]) -> None:
            r = await c.put(path, json=body)
            assert r.status_code == 200, r.text

        async with anyio.create_task_group() as tg:
            for path, body in changes:
                tg.start_soon(put, path, body)
        bot = (await c.get("/api/bot/config")).json()["data"]
        settings = (await c.get("/api/settings")).json()["data"]
    for path, body in changes:
        current = bot if path == "/api/bot/config" else settings
        for key, value in body.items():
            assert current[key] == value, (key, current)
    # Stored as shown.
    assert await api.kernel.storage.state_get("kernel", "bot_config", None) == bot
    stored = await api.kernel.storage.state_get("kernel", "settings", None)
    assert {k: v for k, v in stored.items()} == settings


async def test_deeply_nested_ui_is_400_not_500(api: ApiServer) -> None:
    deep: list[object] = []
    for _ in range(400):
        deep = [deep]
    async with api.authed() as c:
        before = (await c.get("/api/settings")).json()["data"]
        r = await c.put("/api/settings", json={"ui": {"layout": deep}})
        assert_error(r, 400, "ui")
        assert "nested deeper than 32 levels" in r.json()["message"]
        assert (await c.get("/api/settings")).json()["data"] == before
