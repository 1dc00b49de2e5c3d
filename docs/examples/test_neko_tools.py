"""Tests of the neko_tools plugin: its tool, called as the model would call it.

Run them with `pytest docs/examples/test_neko_tools.py`. An LLM plugin lists
`kernel.tools.definitions()` for the model and passes back the name and arguments the
model chose to `kernel.tools.call(...)`; these tests play the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import Kernel
from kernel.testing import MockBot

PLUGINS = Path(__file__).parent / "plugins"

pytestmark = [pytest.mark.anyio, pytest.mark.nekobot(plugin_dirs=[PLUGINS])]


async def test_the_model_is_told_about_the_tool(nekobot_kernel: Kernel) -> None:
    definitions = {d.name: d for d in nekobot_kernel.tools.definitions()}
    tool = definitions["convert_units"]
    assert tool.description.startswith("Convert a length, mass or temperature")
    assert tool.parameters["required"] == ["value", "from", "to"]


async def test_a_call_converts(nekobot_kernel: Kernel) -> None:
    outcome = await nekobot_kernel.tools.call(
        "convert_units", {"value": 10, "from": "km", "to": "mi"}
    )
    assert not outcome.is_error
    assert outcome.value == {"value": 6.214, "unit": "mi"}


async def test_arguments_as_the_model_sends_them(nekobot_kernel: Kernel) -> None:
    outcome = await nekobot_kernel.tools.call(
        "convert_units", '{"value": 100, "from": "C", "to": "F", "digits": 0}', call_id="c7"
    )
    assert (outcome.content, outcome.call_id) == ('{"value": 212.0, "unit": "F"}', "c7")


async def test_the_model_is_told_what_went_wrong(nekobot_kernel: Kernel) -> None:
    tools = nekobot_kernel.tools
    mismatch = await tools.call("convert_units", {"value": 1, "from": "kg", "to": "m"})
    assert mismatch.is_error
    assert mismatch.content == "cannot convert kg to m: they measure different things"
    missing = await tools.call("convert_units", {"value": 1, "from": "kg"})
    assert missing.is_error and "'to' is a required property" in missing.content


async def test_people_can_convert_too(bot: MockBot) -> None:
    assert await bot.receive("/convert 3 ft cm") == ["3 ft = 91.44 cm"]
    assert await bot.receive("/convert -500 C K") == ["Sorry, -500 C is below absolute zero."]
