"""Tests of the counter example: a service, its user, and reloads in between.

Run them with `pytest docs/examples/test_neko_services.py`.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kernel import Kernel, PluginState
from kernel.testing import MockBot

PLUGINS = Path(__file__).parent / "plugins"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.nekobot(plugin_dirs=[PLUGINS], builtin_plugins=[]),
]


async def test_counting_through_the_service(bot: MockBot) -> None:
    assert await bot.receive("/count cats") == ["cats: 1"]
    assert await bot.receive("/count cats") == ["cats: 2"]
    assert await bot.receive("/count") == ["Usage: /count NAME"]


async def test_counting_goes_on_while_the_service_reloads(
    bot: MockBot, nekobot_kernel: Kernel
) -> None:
    replies: list[str] = []

    async def count_twenty() -> None:
        for _ in range(20):
            replies.extend(await bot.receive("/count dogs"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_twenty)
        for _ in range(5):
            await nekobot_kernel.plugins.reload("neko_counter_service")
    assert replies == [f"dogs: {n}" for n in range(1, 21)]


async def test_the_user_waits_while_its_service_is_disabled(
    bot: MockBot, nekobot_kernel: Kernel
) -> None:
    await nekobot_kernel.plugins.disable("neko_counter_service")
    user = nekobot_kernel.plugins.info("neko_counter_user")
    assert user.state is PluginState.PENDING
    assert user.error is not None and "CounterService" in user.error
    assert await bot.receive("/count cats") == []  # no plugin answers /count now
    await nekobot_kernel.plugins.enable("neko_counter_service")
    assert await bot.receive("/count cats") == ["cats: 1"]
