"""Tests of kernel.calling: collecting contributions and calling async hooks in isolation."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pluggy
import pytest

from kernel import (
    CommandSpec,
    MiddlewareSpec,
    PluginLoadError,
    PluginState,
    RouteSpec,
    hookimpl,
)
from kernel.calling import call_each, call_impl, collect_contributions, impls_of
from kernel.contributions import COMMANDS, MIDDLEWARE, ROUTES, Contributions
from kernel.errors import ContributionError
from kernel.hookspecs import PROJECT, SPEC_MODULES
from kernel.lifecycle import Gate, GateClosedError
from kernel.testing import PATIENCE, MockBot, running_kernel
from tests.plugin_factory import write_plugin


def _manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    for module in SPEC_MODULES:
        pm.add_hookspecs(module)
    return pm


def _collect(plugin: object) -> Contributions:
    pm = _manager()
    pm.register(plugin, name="unit#1")
    return collect_contributions(pm, "unit#1", "unit")


async def _handler(cmd: Any) -> str:
    return "ok"


async def _endpoint(request: Any) -> None:
    return None


# -- collect_contributions (units) ------------------------------------------------------


def test_collects_lists_single_items_and_schema() -> None:
    class Plugin:
        @hookimpl
        def nekobot_commands(self) -> Iterable[CommandSpec]:
            return (CommandSpec("a", _handler), CommandSpec("b", _handler))

        @hookimpl
        def nekobot_routes(self) -> RouteSpec:
            return RouteSpec("/x", _endpoint)

        @hookimpl
        def nekobot_http_middleware(self) -> None:
            return None

        @hookimpl
        def nekobot_config_schema(self) -> dict[str, Any]:
            return {"type": "object"}

    got = _collect(Plugin())
    assert [c.name for c in got.of(COMMANDS)] == ["a", "b"]
    assert [r.path for r in got.of(ROUTES)] == ["/x"]
    assert got.of(MIDDLEWARE) == ()
    assert got.config_schema == {"type": "object"}


def test_generators_are_accepted() -> None:
    class Plugin:
        @hookimpl
        def nekobot_commands(self) -> Iterable[CommandSpec]:
            yield CommandSpec("gen", _handler)

    assert [c.name for c in _collect(Plugin()).of(COMMANDS)] == ["gen"]


@pytest.mark.parametrize(
    "value",
    [
        ["not a spec"],
        [CommandSpec("ok", _handler), RouteSpec("/x", _endpoint)],
        "echo",
        {"name": "echo"},
        RouteSpec("/x", _endpoint),
        42,
    ],
    ids=["str-in-list", "mixed", "str", "dict", "single-wrong-item", "int"],
)
def test_wrong_item_types_are_contribution_errors(value: object) -> None:
    class Plugin:
        @hookimpl
        def nekobot_commands(self) -> object:
            return value

    with pytest.raises(ContributionError, match=r"nekobot_commands must yield CommandSpec"):
        _collect(Plugin())


def test_wrong_middleware_type_names_the_hook() -> None:
    class Plugin:
        @hookimpl
        def nekobot_http_middleware(self) -> list[object]:
            return [CommandSpec("x", _handler)]

    with pytest.raises(
        ContributionError, match=f"nekobot_http_middleware must yield {MiddlewareSpec.__name__}"
    ):
        _collect(Plugin())


def test_generator_raising_midway_is_a_contribution_error() -> None:
    class Plugin:
        @hookimpl
        def nekobot_commands(self) -> Iterable[CommandSpec]:
            yield CommandSpec("a", _handler)
            raise RuntimeError("half way")

    with pytest.raises(ContributionError, match="nekobot_commands raised RuntimeError: half way"):
        _collect(Plugin())


def test_async_contribution_hook_is_rejected_without_leaking_a_coroutine() -> None:
    class Plugin:
        @hookimpl
        async def nekobot_commands(self) -> list[CommandSpec]:
            return [CommandSpec("a", _handler)]

    # filterwarnings=error turns a never-awaited coroutine into a failure of this test.
    with pytest.raises(ContributionError, match="must be sync"):
        _collect(Plugin())


def test_raising_contribution_hook_is_a_contribution_error() -> None:
    class Plugin:
        @hookimpl
        def nekobot_routes(self) -> list[RouteSpec]:
            raise KeyError("missing")

    with pytest.raises(ContributionError, match="nekobot_routes raised KeyError"):
        _collect(Plugin())


def test_config_schema_must_be_a_mapping() -> None:
    class Plugin:
        @hookimpl
        def nekobot_config_schema(self) -> list[str]:
            return ["not", "a", "mapping"]

    with pytest.raises(ContributionError, match="must return a mapping"):
        _collect(Plugin())


# -- call_impl / call_each (units) ------------------------------------------------------


@pytest.mark.anyio
async def test_call_impl_bounds_and_isolates(caplog: pytest.LogCaptureFixture) -> None:
    class Plugin:
        @hookimpl
        async def nekobot_plugin_start(self, ctx: Any) -> str:
            return f"started {ctx}"

        @hookimpl
        async def nekobot_plugin_stop(self, ctx: Any) -> None:
            raise ValueError("stop failed")

        @hookimpl
        async def nekobot_on_event(self, event: Any, ctx: Any) -> None:
            await anyio.sleep_forever()

    pm = _manager()
    pm.register(Plugin(), name="unit#1")
    log = logging.getLogger("nekobot.test.calling")
    kwargs = {"ctx": "C", "event": "E"}
    [start] = impls_of(pm, "nekobot_plugin_start", "unit#1")
    outcome = await call_impl(start, kwargs, plugin="unit", hook="h", timeout=PATIENCE, log=log)
    assert (outcome.plugin, outcome.value, outcome.error) == ("unit", "started C", None)
    [stop] = impls_of(pm, "nekobot_plugin_stop", "unit#1")
    outcome = await call_impl(stop, kwargs, plugin="unit", hook="stop", timeout=PATIENCE, log=log)
    assert isinstance(outcome.error, ValueError)
    [on_event] = impls_of(pm, "nekobot_on_event", "unit#1")
    outcome = await call_impl(on_event, kwargs, plugin="unit", hook="ev", timeout=0.05, log=log)
    assert isinstance(outcome.error, TimeoutError)
    assert any("stop of plugin 'unit' raised ValueError" in r.message for r in caplog.records)
    assert any("ev of plugin 'unit' timed out" in r.message for r in caplog.records)
    assert impls_of(pm, "nekobot_no_such_hook", "unit#1") == []

    outcomes = await call_each(
        [("a", stop, kwargs, None), ("b", start, kwargs, None)],
        hook="each",
        timeout=PATIENCE,
        log=log,
    )
    assert [o.plugin for o in outcomes] == ["a", "b"]
    assert isinstance(outcomes[0].error, ValueError) and outcomes[1].value == "started C"

    # In a gate: a closed one is not entered, an open one is left again.
    closed, open_gate = Gate(), Gate(open=True)
    outcomes = await call_each(
        [("a", start, kwargs, closed), ("b", start, kwargs, open_gate)],
        hook="each",
        timeout=PATIENCE,
        log=log,
    )
    assert isinstance(outcomes[0].error, GateClosedError) and outcomes[1].value == "started C"
    assert (closed.in_flight, open_gate.in_flight) == (0, 0)


# -- through the plugin manager ------------------------------------------------------------

_UNKNOWN_HOOK = """
from kernel import hookimpl


@hookimpl
def nekobot_foo():
    return []
"""

_UNKNOWN_UNMARKED = """
def nekobot_bar():
    return []
"""

_UNMARKED = """
from kernel import CommandSpec


async def echo(cmd):
    return cmd.args


def nekobot_commands():
    return [CommandSpec("unmarked", echo)]
"""

_ASYNC_CONTRIBUTION = """
from kernel import CommandSpec, hookimpl


async def echo(cmd):
    return cmd.args


@hookimpl
async def nekobot_commands():
    return [CommandSpec("asynccmd", echo)]
"""

_WRONG_TYPE = """
from kernel import RouteSpec, hookimpl


async def endpoint(request):
    return None


@hookimpl
def nekobot_commands():
    return RouteSpec("/oops", endpoint)
"""

_FINE = """
from kernel import CommandSpec, hookimpl

NEKOBOT_NOTE = "constants and helpers with other names are fine"
nekobot_version = "1.0"


async def echo(cmd):
    return "fine " + cmd.args


@hookimpl
def nekobot_commands():
    return [CommandSpec("fine", echo)]
"""


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("call_unknown", _UNKNOWN_HOOK, "unknown hook(s) nekobot_foo"),
        ("call_unknown_plain", _UNKNOWN_UNMARKED, "unknown hook(s) nekobot_bar"),
        ("call_unmarked", _UNMARKED, "nekobot_commands not marked with @hookimpl"),
        ("call_async", _ASYNC_CONTRIBUTION, "must be sync"),
        ("call_wrong_type", _WRONG_TYPE, "must yield CommandSpec, not RouteSpec"),
    ],
)
async def test_bad_hooks_are_load_errors(
    tmp_path: Path, name: str, source: str, message: str
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, name, source)
    write_plugin(plugins, "call_fine", _FINE)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        info = kernel.plugins.info(name)
        assert info.state is PluginState.FAILED
        assert info.error is not None and message in info.error
        with pytest.raises(PluginLoadError) as caught:
            await kernel.plugins.enable(name)
        assert message in caught.value.message
        assert caught.value.plugin == name
        assert kernel.commands.owned_by(name) == []
        # The broken plugin left nothing registered with pluggy.
        assert not [p for p, _ in kernel.plugins.pm.list_name_plugin() if p.startswith(name)]
        # Other plugins are unaffected.
        assert kernel.plugins.info("call_fine").state is PluginState.ACTIVE
        assert await MockBot(kernel).receive("/fine x") == ["fine x"]
