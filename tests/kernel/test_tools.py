"""Tests of kernel.tools: tools plugins offer the model, through a running kernel.

Each test writes directory plugins that implement `nekobot_llm_tools` and goes through
`kernel.tools` as the agent loop will: the definitions for the model, `lookup` and
`call` with the name and arguments the model chose.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel import PluginLoadError, PluginState, ToolDefinition
from kernel.kernel import Kernel
from kernel.testing import running_kernel
from tests.plugin_factory import purge_modules, write_plugin

ADDER = """
from kernel import ToolSpec, hookimpl

SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer"},
        "b": {"type": "integer", "default": 1},
    },
    "required": ["a"],
    "additionalProperties": False,
}

async def add(call):
    return {"sum": call.arguments["a"] + call.arguments["b"], "by": call.ctx.name}

@hookimpl
def nekobot_llm_tools():
    return [ToolSpec("add", add, "Add two integers", parameters=SCHEMA)]
"""


def tool_plugin(tool: str, answer: str, **spec: Any) -> str:
    """A plugin with one tool `tool` that answers `answer` (and `ToolSpec` options)."""
    options = "".join(f", {k}={v!r}" for k, v in spec.items())
    return f"""
from kernel import ToolSpec, hookimpl

async def handler(call):
    return {answer!r} + " as " + call.called_as

@hookimpl
def nekobot_llm_tools():
    return [ToolSpec({tool!r}, handler, "a tool"{options})]
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "plugins"
    directory.mkdir()
    return directory


@pytest.fixture
async def kernel(tmp_path: Path, plugin_dir: Path) -> AsyncIterator[Kernel]:
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as k:
        yield k


async def add_plugin(kernel: Kernel, plugin_dir: Path, name: str, code: str) -> None:
    purge_modules(name)
    write_plugin(plugin_dir, name, code)
    await kernel.plugins.rescan()
    await kernel.plugins.enable(name)


# ------------------------------------------------------------------ registering and calling


@pytest.mark.anyio
async def test_nekobot_llm_tools_are_offered_called_and_withdrawn(
    kernel: Kernel, plugin_dir: Path
) -> None:
    await add_plugin(kernel, plugin_dir, "tl_adder", ADDER)
    [definition] = kernel.tools.definitions()
    assert isinstance(definition, ToolDefinition)
    assert (definition.name, definition.description) == ("add", "Add two integers")
    assert definition.parameters["required"] == ["a"]
    assert kernel.plugins.info("tl_adder").tools == ("add",)
    entry = kernel.tools.lookup("add")
    assert entry is not None and entry.owner == "tl_adder"
    assert kernel.tools.lookup("tl_adder__add") is entry

    outcome = await kernel.tools.call("add", {"a": 2, "b": 3}, call_id="c1")
    assert (outcome.is_error, outcome.value, outcome.call_id) == (
        False,
        {"sum": 5, "by": "tl_adder"},
        "c1",
    )
    assert outcome.content == '{"sum": 5, "by": "tl_adder"}'
    # The JSON text a model API sends works too, and the schema's defaults are filled in.
    assert (await kernel.tools.call("add", '{"a": 2}')).value == {"sum": 3, "by": "tl_adder"}

    await kernel.plugins.disable("tl_adder")
    assert kernel.tools.definitions() == [] and len(kernel.tools) == 0
    assert kernel.tools.lookup("add") is None
    outcome = await kernel.tools.call("add", {"a": 1})
    assert outcome.is_error and outcome.content == "there is no tool 'add'"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "invalid arguments for tool 'add': 'a' is a required property"),
        ({"a": "2"}, "invalid arguments for tool 'add': argument 'a': '2' is not of type"),
        ({"a": 1, "c": 2}, "invalid arguments for tool 'add': Additional properties"),
        ("{not json", "the arguments of tool 'add' are not valid JSON"),
        ("[1, 2]", "the arguments of tool 'add' must be a JSON object"),
    ],
)
async def test_invalid_arguments_are_an_error_result_not_a_call(
    kernel: Kernel, plugin_dir: Path, arguments: Any, message: str
) -> None:
    await add_plugin(kernel, plugin_dir, "tl_args", ADDER)
    outcome = await kernel.tools.call("add", arguments)
    assert outcome.is_error and outcome.value is None
    assert outcome.content.startswith(message), outcome.content


FAULTY = """
import anyio
from kernel import ToolError, ToolSpec, hookimpl

async def refuse(call):
    raise ToolError("the dice fell off the table")

async def crash(call):
    raise ValueError("secret internals")

async def hang(call):
    await anyio.Event().wait()

async def odd(call):
    return {1, 2}

@hookimpl
def nekobot_llm_tools():
    return [
        ToolSpec("refuse", refuse),
        ToolSpec("crash", crash),
        ToolSpec("hang", hang, timeout=0.2),
        ToolSpec("odd", odd),
    ]
"""


@pytest.mark.anyio
async def test_handler_errors_and_timeouts_come_back_as_error_results(
    kernel: Kernel, plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await add_plugin(kernel, plugin_dir, "tl_faulty", FAULTY)
    refused = await kernel.tools.call("refuse")
    assert (refused.is_error, refused.content) == (True, "the dice fell off the table")

    with caplog.at_level(logging.ERROR, logger="nekobot"):
        crashed = await kernel.tools.call("crash")
    # The model learns that the tool failed, not the exception's text; the log has it.
    assert (crashed.is_error, crashed.content) == (True, "tool 'crash' failed (ValueError)")
    assert any("secret internals" in r.getMessage() for r in caplog.records)

    with anyio.fail_after(5):
        hung = await kernel.tools.call("hang")
    assert (hung.is_error, hung.content) == (True, "tool 'hang' timed out after 0.2s")

    odd = await kernel.tools.call("odd")
    assert (odd.is_error, odd.content) == (True, "tool 'odd' failed (its result is not JSON)")


# ------------------------------------------------------------------ validation at load


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ('ToolSpec("bad name", handler)', "a tool name is 1-64 letters, digits"),
        ('ToolSpec("x" * 65, handler)', "a tool name is 1-64 letters, digits"),
        ('ToolSpec("", handler)', "a tool name is 1-64 letters, digits"),
        ('ToolSpec("a__b", handler)', "'__' is reserved for qualified names"),
        ('ToolSpec("x" * 60, handler)', "its qualified name tl_bad__xxx"),
        (
            'ToolSpec("t", handler, parameters={"type": "object", "properties": 3})',
            "parameters are not a valid JSON Schema: 3 is not of type 'object'",
        ),
        (
            'ToolSpec("t", handler, parameters={"type": "array"})',
            'parameters must be a schema of type "object"',
        ),
        ('ToolSpec("t", handler, parameters=[1])', "parameters must be a JSON Schema object"),
        ('ToolSpec("t", handler, timeout=0)', "timeout must be positive"),
        ('ToolSpec("t", handler), ToolSpec("t", handler)', "declares tool 't' twice"),
    ],
)
async def test_a_bad_tool_is_a_load_error_naming_it(
    kernel: Kernel, plugin_dir: Path, spec: str, problem: str
) -> None:
    code = f"""
from kernel import ToolSpec, hookimpl

async def handler(call):
    return "ok"

@hookimpl
def nekobot_llm_tools():
    return [{spec}]
"""
    with pytest.raises(PluginLoadError) as raised:
        await add_plugin(kernel, plugin_dir, "tl_bad", code)
    assert problem in raised.value.message
    assert "plugin 'tl_bad'" in raised.value.message
    assert kernel.plugins.info("tl_bad").state is PluginState.FAILED
    assert len(kernel.tools) == 0


# ------------------------------------------------------------------ clashes

HOLDER, NEWCOMER = "tl_zz_holder", "tl_aa_newcomer"


async def start_with_holder(kernel: Kernel, plugin_dir: Path) -> None:
    """`HOLDER` offers `roll` first; `NEWCOMER` offers a `roll` of its own after it."""
    await add_plugin(kernel, plugin_dir, HOLDER, tool_plugin("roll", "holder"))
    await add_plugin(kernel, plugin_dir, NEWCOMER, tool_plugin("roll", "newcomer"))


async def assert_holder(kernel: Kernel, holder: str, other: str) -> None:
    assert (await kernel.tools.call("roll")).content == f"{holder.split('_')[-1]} as roll"
    qualified = f"{other}__roll"
    assert (await kernel.tools.call(qualified)).content == (
        f"{other.split('_')[-1]} as {qualified}"
    )
    assert [d.name for d in kernel.tools.definitions()] == sorted(["roll", qualified])
    [conflict] = kernel.tools.conflicts()
    assert (conflict.name, conflict.holder) == ("roll", holder)


@pytest.mark.anyio
async def test_a_clash_leaves_the_holder_and_qualifies_the_newcomer(
    kernel: Kernel, plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nekobot"):
        await start_with_holder(kernel, plugin_dir)
    warnings = [r.getMessage() for r in caplog.records if "tool 'roll'" in r.getMessage()]
    assert warnings and HOLDER in warnings[-1] and NEWCOMER in warnings[-1]
    await assert_holder(kernel, HOLDER, NEWCOMER)
    [conflict] = kernel.tools.conflicts()
    assert conflict.candidates == ((HOLDER, "roll"), (NEWCOMER, f"{NEWCOMER}__roll"))
    # The holder is reachable by its qualified name too.
    assert (await kernel.tools.call(f"{HOLDER}__roll")).content.startswith("holder")

    await kernel.plugins.reload(HOLDER)
    await assert_holder(kernel, HOLDER, NEWCOMER)
    await kernel.plugins.reload(NEWCOMER)
    await assert_holder(kernel, HOLDER, NEWCOMER)


@pytest.mark.anyio
async def test_the_holder_keeps_the_name_across_a_restart(tmp_path: Path, plugin_dir: Path) -> None:
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        await start_with_holder(kernel, plugin_dir)
        await assert_holder(kernel, HOLDER, NEWCOMER)
    # At start plugins load in name order, so the newcomer claims the name first now.
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        await assert_holder(kernel, HOLDER, NEWCOMER)


@pytest.mark.anyio
async def test_disabling_the_holder_passes_the_name_on(kernel: Kernel, plugin_dir: Path) -> None:
    await start_with_holder(kernel, plugin_dir)
    await kernel.plugins.disable(HOLDER)
    assert kernel.tools.conflicts() == []
    assert (await kernel.tools.call("roll")).content == "newcomer as roll"
    assert [d.name for d in kernel.tools.definitions()] == ["roll"]
    assert (await kernel.tools.call(f"{HOLDER}__roll")).is_error
    # The former holder comes back as the newcomer.
    await kernel.plugins.enable(HOLDER)
    await assert_holder(kernel, NEWCOMER, HOLDER)


# ------------------------------------------------------------------ calls and reloads

SWAPPING = """
import anyio
from kernel import ToolSpec, hookimpl

GENERATION = {generation}

async def which(call):
    return GENERATION

@hookimpl
async def nekobot_plugin_stop(ctx):
    probe = ctx.services.current(dict)
    if probe is not None:
        probe["stopping"].set()
        await probe["release"].wait()

@hookimpl
def nekobot_llm_tools():
    return [ToolSpec("which", which)]
"""


@pytest.mark.anyio
async def test_a_call_during_a_reload_waits_for_the_new_generation(
    kernel: Kernel, plugin_dir: Path
) -> None:
    await add_plugin(kernel, plugin_dir, "tl_swap", SWAPPING.format(generation=1))
    assert (await kernel.tools.call("which")).value == 1
    probe = {"stopping": anyio.Event(), "release": anyio.Event()}
    kernel.services.provide("tests", dict, probe)
    write_plugin(plugin_dir, "tl_swap", SWAPPING.format(generation=2))
    outcomes = []

    async def call() -> None:
        outcomes.append(await kernel.tools.call("which"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kernel.plugins.reload, "tl_swap")
            # The old generation's gate is closed while its stop hook runs.
            await probe["stopping"].wait()
            kernel.services.withdraw("tests", dict)
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            assert outcomes == []  # the call waits rather than fail
            probe["release"].set()
    [outcome] = outcomes
    assert (outcome.is_error, outcome.value) == (False, 2)


HANGING = """
import anyio
from kernel import ToolSpec, hookimpl

async def hang(call):
    await anyio.Event().wait()

@hookimpl
def nekobot_llm_tools():
    return [ToolSpec("hang", hang, timeout=60)]
"""


@pytest.mark.anyio
async def test_a_call_that_outlives_its_plugin_is_cancelled(
    tmp_path: Path, plugin_dir: Path
) -> None:
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugin_dir], handler_timeout=0.3
    ) as kernel:
        await add_plugin(kernel, plugin_dir, "tl_hang", HANGING)
        outcomes = []

        async def call() -> None:
            outcomes.append(await kernel.tools.call("hang"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                # Disabling waits `handler_timeout` for the call, then cancels it.
                await kernel.plugins.disable("tl_hang")
        [outcome] = outcomes
        assert outcome.is_error
        assert outcome.content == "tool 'hang' was cancelled: its plugin went away"
