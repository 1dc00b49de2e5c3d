"""Leak tests: a plugin that is enabled then disabled, or reloaded many times, leaves
nothing behind (hookimpls, registry entries, routes, tasks, modules, objects)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import pytest

from kernel import PluginLoadError, PluginState, ReloadError
from kernel.kernel import Kernel
from kernel.testing import MockBot, running_kernel
from tests.plugin_factory import write_plugin

LEAKY = """
import anyio
from starlette.responses import PlainTextResponse
from kernel import ChannelSpec, CommandSpec, RouteSpec, ToolSpec, hookimpl
from . import sub

class LkService:
    pass

provides = (LkService,)

async def ping(cmd):
    return sub.answer() + " " + cmd.args

async def page(request):
    return PlainTextResponse(sub.answer())

async def heartbeat(ctx):
    while True:  # a task that lives as long as the plugin (its disposal is what counts)
        await anyio.sleep(3600)

@hookimpl
def nekobot_commands():
    return [CommandSpec("lk_ping", ping, aliases=("lk_p",))]

@hookimpl
def nekobot_routes():
    return [RouteSpec("/lk/page", page, methods=("GET", "POST"), public=True)]

@hookimpl
def nekobot_ws_channels():
    return [ChannelSpec("lk_channel")]

async def lookup(call):
    return sub.answer()

@hookimpl
def nekobot_llm_tools():
    return [ToolSpec("lk_tool", lookup, parameters={"type": "object"})]

@hookimpl
async def nekobot_plugin_start(ctx):
    ctx.start_task(heartbeat, ctx, name="heartbeat")
    ctx.on_dispose(lambda: None)
    ctx.provide(LkService, LkService())

@hookimpl
async def nekobot_on_message(event, ctx):
    return None
"""

SUB = """
def answer():
    return "pong"
"""


def hookimpl_count(pm: pluggy.PluginManager) -> int:
    """How many hookimpls are registered, over every hook."""
    return sum(
        len(caller.get_hookimpls())
        for caller in vars(pm.hook).values()
        if isinstance(caller, pluggy.HookCaller)
    )


def snapshot(kernel: Kernel) -> dict[str, Any]:
    """Counts of everything a plugin can add to a kernel or the process."""
    plugins = kernel.plugins
    return {
        "hookimpls": hookimpl_count(plugins.pm),
        "pm plugins": len(plugins.pm.list_name_plugin()),
        "hook index": sum(len(v) for v in plugins.hook_index.values()),
        "module owners": len(plugins.module_owners),
        **{kind.name: len(registry) for kind, registry in kernel.registries.items()},
        "command entries": len(kernel.commands.entries()),
        "command conflicts": len(kernel.commands.conflicts()),
        "services": len(kernel.services.names()),
        "asgi routes": len(kernel.asgi_app.routes),
        "tasks": len(asyncio.all_tasks()),
        "finder roots": len(kernel.loader.finder.roots),
        "meta path": len(sys.meta_path),
        "sys.modules": set(sys.modules),
    }


def collect() -> None:
    for _ in range(3):
        gc.collect()


def drop_captured_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Forget the records pytest captured: they are objects (and keep tracebacks, which
    the kernel's own handlers do not), so only the kernel's references count."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, type(caplog.handler)):
            handler.clear()  # in place: pytest's stash holds the same list


def referrer_report(obj: object) -> str:
    """Who still holds `obj` (for the assertion message)."""
    lines = []
    for ref in gc.get_referrers(obj):
        if isinstance(ref, dict):
            holders = [type(r).__name__ for r in gc.get_referrers(ref)]
            lines.append(f"dict held by {holders[:5]}: keys {list(ref)[:8]}")
        else:
            lines.append(f"{type(ref).__name__}: {str(ref)[:120]}")
    return "\n".join(lines)


def module_refs() -> tuple[weakref.ref[ModuleType], weakref.ref[ModuleType]]:
    return weakref.ref(sys.modules["lk_leaky"]), weakref.ref(sys.modules["lk_leaky.sub"])


@pytest.mark.anyio
async def test_enable_disable_leaves_nothing_behind(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], builtin_plugins=["api", "help"]
    ) as kernel:
        bot = MockBot(kernel)
        write_plugin(plugins, "lk_leaky", LEAKY, files={"sub.py": SUB})
        await kernel.plugins.rescan()
        collect()
        before = snapshot(kernel)

        await kernel.plugins.enable("lk_leaky")
        assert await bot.receive("/lk_ping a") == ["pong a"]
        loaded = snapshot(kernel)
        # Sanity: the snapshot sees what the plugin added.
        assert loaded["tasks"] == before["tasks"] + 1
        assert loaded["commands"] == before["commands"] + 1
        assert loaded["routes"] == before["routes"] + 2
        assert loaded["asgi routes"] == before["asgi routes"] + 1
        assert loaded["channels"] == before["channels"] + 1
        assert loaded["services"] == before["services"] + 1
        assert loaded["tools"] == before["tools"] + 1
        assert loaded["hookimpls"] == before["hookimpls"] + 6
        assert {"lk_leaky", "lk_leaky.sub"} <= loaded["sys.modules"] - before["sys.modules"]
        module, submodule = module_refs()
        gen = weakref.ref(kernel.plugins.records["lk_leaky"].generation)  # type: ignore[arg-type]

        await kernel.plugins.disable("lk_leaky")
        collect()

        assert snapshot(kernel) == before
        assert kernel.plugins.info("lk_leaky").state is PluginState.DISPOSED
        assert gen() is None, referrer_report(gen())
        assert module() is None, referrer_report(module())
        assert submodule() is None, referrer_report(submodule())
        assert await bot.receive("/lk_ping a") == []


@pytest.mark.anyio
async def test_failed_loads_leave_nothing_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        refs: list[weakref.ref[ModuleType]] = []
        kernel.services.provide("tests", list, refs)
        write_plugin(plugins, "lk_leaky", LEAKY, files={"sub.py": SUB})
        await kernel.plugins.rescan()
        collect()
        before = snapshot(kernel)
        broken = LEAKY.replace(
            "ctx.provide(",
            "import sys, weakref\n"
            "    ctx.services.current(list).append(weakref.ref(sys.modules[__name__]))\n"
            "    raise RuntimeError('no start')\n"
            "    ctx.provide(",
        )
        write_plugin(plugins, "lk_leaky", broken, files={"sub.py": SUB})
        for _ in range(3):
            with pytest.raises(PluginLoadError, match="no start"):
                await kernel.plugins.enable("lk_leaky")
        drop_captured_logs(caplog)
        collect()
        assert snapshot(kernel) == before
        assert kernel.plugins.info("lk_leaky").state is PluginState.FAILED
        assert len(refs) == 3
        alive = [r() for r in refs if r() is not None]
        assert not alive, referrer_report(alive[0])


@pytest.mark.anyio
async def test_many_reloads_do_not_grow_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lk_leaky", LEAKY, files={"sub.py": SUB})
    # A small log buffer: its (bounded) records must not count as growth.
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], builtin_plugins=["help"], log_buffer=5
    ) as kernel:
        bot = MockBot(kernel)
        names = kernel.plugins
        old_modules: list[weakref.ref[ModuleType]] = []

        async def cycles(n: int, *, watch: bool) -> None:
            for _ in range(n):
                if watch:
                    old_modules.extend(module_refs())
                assert await bot.receive("/lk_ping x") == ["pong x"]
                await names.reload("lk_leaky")
            bot.clear()

        # Weak references are taken in the first cycles only: they are objects too.
        await cycles(20, watch=True)
        drop_captured_logs(caplog)
        collect()
        after_20 = snapshot(kernel)
        objects_20 = len(gc.get_objects())

        await cycles(180, watch=False)
        drop_captured_logs(caplog)
        collect()
        after_200 = snapshot(kernel)
        objects_200 = len(gc.get_objects())

        assert after_200 == after_20
        assert names.info("lk_leaky").reload_count == 200
        # A leaked generation costs dozens of objects; 180 of them would be obvious.
        assert objects_200 - objects_20 < 300, objects_200 - objects_20
        alive = [r() for r in old_modules if r() is not None]
        assert not alive, referrer_report(alive[0])
        assert await bot.receive("/lk_ping still") == ["pong still"]
        assert await bot.receive("/lk_p here") == ["pong here"]


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["import", "start"])
async def test_failed_reloads_leave_everything_as_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lk_leaky", LEAKY, files={"sub.py": SUB})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        module = sys.modules["lk_leaky"]
        collect()
        before = snapshot(kernel)
        routes = [(e.owner, e.item[0]) for e in kernel.routes]
        if failure == "import":
            broken = LEAKY.replace("from . import sub", "from . import sub\nraise ImportError('x')")
        else:
            broken = LEAKY.replace(
                "ctx.provide(", "raise RuntimeError('no start')\n    ctx.provide("
            )
        write_plugin(plugins, "lk_leaky", broken, files={"sub.py": SUB})
        for _ in range(3):
            with pytest.raises(ReloadError):
                await kernel.plugins.reload("lk_leaky")
        drop_captured_logs(caplog)
        collect()
        assert snapshot(kernel) == before
        assert [(e.owner, e.item[0]) for e in kernel.routes] == routes
        assert sys.modules["lk_leaky"] is module
        assert kernel.plugins.info("lk_leaky").state is PluginState.ACTIVE
        assert await bot.receive("/lk_ping a") == ["pong a"]
