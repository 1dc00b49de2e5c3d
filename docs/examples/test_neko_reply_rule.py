"""Tests of one reply per message, with the neko_greeter and neko_parrot plugins.

Run them with `pytest docs/examples/test_neko_reply_rule.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import Kernel
from kernel.testing import MockBot

PLUGINS = Path(__file__).parent / "chat_plugins"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.nekobot(plugin_dirs=[PLUGINS], builtin_plugins=["help"]),
]


async def test_a_greeting_gets_one_answer(bot: MockBot) -> None:
    assert await bot.receive("Hello!") == ["Hello, Tester!"]


async def test_what_the_greeter_declines_goes_to_the_fallback(bot: MockBot) -> None:
    assert await bot.receive("nice weather") == ["You said: nice weather"]


async def test_passed_on_the_message_reaches_the_fallback(bot: MockBot) -> None:
    assert await bot.receive("I like cats") == [
        "Purr.",
        "neko_greeter said it; and I say: I like cats",
    ]


async def test_a_whisper_is_not_answered(bot: MockBot) -> None:
    assert await bot.receive("psst, the bot can't hear this") == []


async def test_a_command_is_not_offered_to_either(bot: MockBot) -> None:
    [listing] = await bot.receive("/help")
    assert listing.startswith("Commands:")


async def test_without_the_greeter_the_fallback_answers_all(
    bot: MockBot, nekobot_kernel: Kernel
) -> None:
    await nekobot_kernel.plugins.disable("neko_greeter")
    assert await bot.receive("hello") == ["You said: hello"]
