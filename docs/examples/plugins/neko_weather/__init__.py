"""neko_weather: weather reports in chat, a forecast board over HTTP, kept fresh in the
background.

The forecasts are made up, so that this example runs anywhere, offline; a real plugin
would ask a weather service with `ctx.http`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from kernel import CommandInvocation, CommandSpec, PluginContext, RouteSpec, hookimpl

CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy")


def forecast(city: str, units: str) -> dict[str, Any]:
    """Today's forecast for `city` (made up, but the same every time)."""
    digest = hashlib.sha256(city.casefold().encode()).digest()
    celsius = digest[0] % 35 - 5
    return {
        "city": city,
        "condition": CONDITIONS[digest[1] % len(CONDITIONS)],
        "temperature": celsius if units == "metric" else round(celsius * 9 / 5 + 32),
        "unit": "°C" if units == "metric" else "°F",
    }


def describe(report: Mapping[str, Any]) -> str:
    """One line of chat for a forecast."""
    return f"{report['city']}: {report['condition']}, {report['temperature']}{report['unit']}"


async def weather(cmd: CommandInvocation) -> str:
    """`/weather [city]` reports; `/weather home CITY` remembers the sender's city."""
    home_key = f"home:{cmd.event.platform}:{cmd.event.sender.id}"
    if cmd.argv[:1] == ("home",):
        city = " ".join(cmd.argv[1:])
        if not city:
            return f"Usage: {cmd.prefix}weather home CITY"
        await cmd.ctx.store.kv_set(home_key, city)
        return f"Your home city is now {city}."
    city = cmd.args or await cmd.ctx.store.kv_get(home_key) or cmd.ctx.config["default_city"]
    return describe(forecast(city, cmd.ctx.config["units"]))


@hookimpl
def nekobot_commands() -> Iterable[CommandSpec]:
    return [
        CommandSpec(
            "weather",
            weather,
            aliases=("w",),
            description="Today's weather",
            usage="/weather [city] | /weather home CITY",
        )
    ]


@dataclass
class Board:
    """The forecasts of the configured cities."""

    forecasts: list[dict[str, Any]] = field(default_factory=list)
    refreshes: int = 0

    def refresh(self, config: Mapping[str, Any]) -> None:
        self.forecasts = [forecast(city, config["units"]) for city in config["cities"]]
        self.refreshes += 1


# A module global lives exactly as long as one generation of the plugin: every reload
# imports this module afresh, so the new generation starts with a new, empty board.
board = Board()


async def forecasts(request: Request) -> JSONResponse:
    """`GET /api/neko_weather/forecasts`: the board, for signed-in users only."""
    data = {"refreshes": board.refreshes, "forecasts": board.forecasts}
    return JSONResponse({"status": "success", "data": data})


@hookimpl
def nekobot_routes() -> Iterable[RouteSpec]:
    return [
        RouteSpec(
            "/api/neko_weather/forecasts",
            forecasts,
            methods=("GET",),
            summary="The forecast board",
        )
    ]


async def keep_fresh(ctx: PluginContext) -> None:
    """Refresh the board every `refresh_seconds`, until the plugin goes away."""
    while True:
        await anyio.sleep(ctx.config["refresh_seconds"])
        board.refresh(ctx.config)


@hookimpl
async def nekobot_plugin_start(ctx: PluginContext) -> None:
    board.refresh(ctx.config)
    ctx.start_task(keep_fresh, ctx, name="keep the board fresh")
    ctx.log.info("forecasting for %s", ", ".join(ctx.config["cities"]))
