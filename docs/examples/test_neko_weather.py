"""Tests of the neko_weather plugin, as its author writes them.

Run them with `pytest docs/examples/test_neko_weather.py`: the `bot` and `nekobot_kernel`
fixtures come with NekoBot's pytest plugin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from kernel import Kernel
from kernel.asgi import PRINCIPAL
from kernel.testing import MockBot, wait_until

PLUGINS = Path(__file__).parent / "plugins"

pytestmark = [pytest.mark.anyio, pytest.mark.nekobot(plugin_dirs=[PLUGINS])]


async def test_weather_in_a_city(bot: MockBot) -> None:
    await bot.receive("/weather Paris")
    assert bot.replies == ["Paris: rainy, 17°C"]


async def test_home_city_is_remembered(bot: MockBot) -> None:
    assert await bot.receive("/weather home Oslo") == ["Your home city is now Oslo."]
    assert await bot.receive("/w") == ["Oslo: cloudy, -3°C"]


async def test_configuration_applies(bot: MockBot, nekobot_kernel: Kernel) -> None:
    assert await bot.receive("/weather") == ["Tokyo: windy, -5°C"]
    await nekobot_kernel.plugins.set_config("neko_weather", {"units": "imperial"})
    assert await bot.receive("/weather") == ["Tokyo: windy, 23°F"]


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


def signed_in(app: ASGIApp) -> ASGIApp:
    """`app` as a signed-in user reaches it: routes are private unless they say public."""

    async def with_principal(scope, receive, send):  # type: ignore[no-untyped-def]
        await app({**scope, PRINCIPAL: "tester"}, receive, send)

    return with_principal


async def get_board(kernel: Kernel) -> httpx.Response:
    transport = httpx.ASGITransport(app=signed_in(kernel.asgi_app))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return await client.get("/api/neko_weather/forecasts")


async def test_board_is_private(nekobot_kernel: Kernel) -> None:
    transport = httpx.ASGITransport(app=nekobot_kernel.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        response = await client.get("/api/neko_weather/forecasts")
    assert response.status_code == 401


async def test_board_over_http(nekobot_kernel: Kernel) -> None:
    response = await get_board(nekobot_kernel)
    assert response.status_code == 200
    board = response.json()["data"]["forecasts"]
    assert [(f["city"], f["temperature"]) for f in board] == [("Tokyo", -5), ("Paris", 17)]


async def test_board_is_refreshed_in_the_background(nekobot_kernel: Kernel) -> None:
    await nekobot_kernel.plugins.set_config("neko_weather", {"refresh_seconds": 0.01})

    async def refreshed_three_times() -> bool:
        return (await get_board(nekobot_kernel)).json()["data"]["refreshes"] >= 3

    # The task's progress shows only in its answers: poll them (wait_until's deadline
    # is generous, so a slow machine is no failure).
    await wait_until(refreshed_three_times)
