"""Tests of reloading: transactional reload failures, reload under message load, and
hot reload (kernel.reload) driven by file changes."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from kernel import PluginState, ReloadError
from kernel.kernel import Kernel
from kernel.protocols import AuthService
from kernel.testing import MockBot, record_events, record_logs, running_kernel, wait_until
from tests.plugin_factory import write_plugin

MAIN = """
from starlette.responses import PlainTextResponse
from kernel import CommandSpec, RouteSpec, hookimpl
{extra_imports}

async def cmd(cmd):
    return "{tag}"

async def page(request):
    return PlainTextResponse("{tag}")

@hookimpl
def nekobot_commands():
    return [{commands}]

@hookimpl
def nekobot_routes():
    return [{routes}]

@hookimpl
async def nekobot_plugin_start(ctx):
    {start}
"""


def main_code(
    tag: str,
    *,
    extra_imports: str = "",
    commands: str = 'CommandSpec("rl_cmd", cmd)',
    routes: str = 'RouteSpec("/rl/main", page, public=True)',
    start: str = "pass",
) -> str:
    return MAIN.format(
        tag=tag, extra_imports=extra_imports, commands=commands, routes=routes, start=start
    )


OTHER = """
from starlette.responses import PlainTextResponse
from kernel import RouteSpec, hookimpl

async def taken(request):
    return PlainTextResponse("other")

@hookimpl
def nekobot_routes():
    return [RouteSpec("/rl/taken", taken, methods=("GET",), public=True)]
"""

BROKEN = {
    "syntax error": main_code("v2").replace("async def cmd(cmd):", "async def cmd(cmd)"),
    "import error": main_code("v2", extra_imports="raise ImportError('rl dependency missing')"),
    "start raises": main_code("v2", start="raise RuntimeError('rl start exploded')"),
    "route conflict": main_code(
        "v2",
        routes='RouteSpec("/rl/main", page, public=True), '
        'RouteSpec("/rl/taken", page, methods=("GET",), public=True)',
    ),
    "duplicate command key": main_code(
        "v2", commands='CommandSpec("rl_cmd", cmd), CommandSpec("rl_new", cmd, aliases=("rl_cmd",))'
    ),
}

EXPECTED_ERROR = {
    "syntax error": "SyntaxError",
    "import error": "rl dependency missing",
    "start raises": "rl start exploded",
    "route conflict": "already registered by plugin 'rl_other'",
    "duplicate command key": "declares command key 'rl_cmd' twice",
}


async def http_get(kernel: Kernel, path: str) -> tuple[int, str]:
    transport = httpx.ASGITransport(app=kernel.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        response = await client.get(path)
        return response.status_code, response.text


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(BROKEN))
async def test_failed_reload_keeps_the_old_generation(tmp_path: Path, kind: str) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_main", main_code("v1"))
    write_plugin(plugins, "rl_other", OTHER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        events = record_events(kernel)
        bot = MockBot(kernel)
        assert await bot.receive("/rl_cmd") == ["v1"]
        old_generation = kernel.plugins.records["rl_main"].generation
        routes_before = sorted(str(e.item[0]) for e in kernel.routes)
        seq_before = max((r.seq for r in kernel.logging.buffer.records), default=0)

        write_plugin(plugins, "rl_main", BROKEN[kind])
        with pytest.raises(ReloadError) as caught:
            await kernel.plugins.reload("rl_main")

        assert caught.value.plugin == "rl_main"
        assert "previous version kept" in caught.value.message
        assert EXPECTED_ERROR[kind] in caught.value.message
        # The old generation still answers, on every surface.
        assert await bot.receive("/rl_cmd") == ["v1"]
        assert await http_get(kernel, "/rl/main") == (200, "v1")
        assert await http_get(kernel, "/rl/taken") == (200, "other")
        assert kernel.commands.lookup("rl_new") is None
        assert sorted(str(e.item[0]) for e in kernel.routes) == routes_before
        info = kernel.plugins.info("rl_main")
        assert info.state is PluginState.ACTIVE
        assert info.reload_count == 0
        if kind != "start raises":  # a failed start brings the old generation back anew
            assert kernel.plugins.records["rl_main"].generation is old_generation
        names = [n for n, _ in kernel.plugins.pm.list_name_plugin() if n.startswith("rl_main")]
        assert len(names) == 1
        # The failure is logged against the plugin and emitted as an event.
        assert any(
            r.seq > seq_before
            and r.plugin == "rl_main"
            and r.level == "ERROR"
            and EXPECTED_ERROR[kind] in r.message
            for r in kernel.logging.buffer.records
        )

        await events.wait_for(lambda e: e.type == "plugin.failed" and e.plugin == "rl_main")
        [failed] = [e for e in events.items if e.type == "plugin.failed"]
        assert EXPECTED_ERROR[kind] in failed.data["error"]

        write_plugin(plugins, "rl_main", main_code("v2"))
        result = await kernel.plugins.reload("rl_main")
        assert result.plugin.state is PluginState.ACTIVE
        assert result.plugin.reload_count == 1
        assert await bot.receive("/rl_cmd") == ["v2"]
        assert await http_get(kernel, "/rl/main") == (200, "v2")
        assert any(e.type == "plugin.reloaded" for e in events.items)


HOLDER = """
from kernel import CommandSpec, hookimpl

async def mine(cmd):
    return "holder"

@hookimpl
def nekobot_commands():
    return [CommandSpec("rl_shared", mine)]
"""


@pytest.mark.anyio
async def test_reload_adding_a_contested_command_is_a_conflict_not_a_failure(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_holder", HOLDER)
    write_plugin(plugins, "rl_main", main_code("v1"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        write_plugin(
            plugins,
            "rl_main",
            main_code("v2", commands='CommandSpec("rl_cmd", cmd), CommandSpec("rl_shared", cmd)'),
        )
        result = await kernel.plugins.reload("rl_main")
        assert result.plugin.state is PluginState.ACTIVE
        [conflict] = result.conflicts
        assert conflict.key == "rl_shared" and conflict.holder == "rl_holder"
        assert await bot.receive("/rl_shared") == ["holder"]
        assert await bot.receive("/rl_main:rl_shared") == ["v2"]
        assert await bot.receive("/rl_cmd") == ["v2"]


@pytest.mark.anyio
async def test_reload_of_a_vanished_plugin_fails_and_keeps_it(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "rl_gone", main_code("v1", commands='CommandSpec("rl_g", cmd)'))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        moved = shutil.move(str(path), str(tmp_path / "elsewhere"))
        with pytest.raises(ReloadError, match="gone"):
            await kernel.plugins.reload("rl_gone")
        assert await MockBot(kernel).receive("/rl_g") == ["v1"]
        shutil.move(moved, str(path))
        await kernel.plugins.reload("rl_gone")
        assert kernel.plugins.info("rl_gone").state is PluginState.ACTIVE


COUNTER = """
import anyio
from kernel import CommandSpec, hookimpl

async def count(cmd):
    await anyio.sleep(0.001)  # a reload finds handlers in flight and waits for them
    return f"{tag} " + cmd.args

@hookimpl
def nekobot_commands():
    return [CommandSpec("count", count)]
"""


@pytest.mark.anyio
async def test_reload_while_messages_stream(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_counter", COUNTER.format(tag="g0"))
    messages, conversations, reloads = 300, 6, 10
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        done = 0
        step = messages // (reloads + 1)
        # Reload i starts once i * step messages are answered, while the messages in
        # flight go on; a sender that sees mark i waits until reload i is done. At most
        # one message per conversation is in flight when a mark is reached, so every
        # generation serves at least step - conversations messages however slow the
        # machine (waiting for reload i - 1 instead let the last generation serve none).
        reached = [anyio.Event() for _ in range(reloads + 1)]
        finished = [anyio.Event() for _ in range(reloads + 1)]

        async def conversation(chat: int) -> None:
            nonlocal done
            for n in range(chat, messages, conversations):
                mark = min(done // step, reloads)
                if mark >= 1:
                    await finished[mark].wait()
                await bot.receive(f"/count {n}", chat_id=f"chat-{chat}")
                done += 1
                if done % step == 0 and done // step <= reloads:
                    reached[done // step].set()

        async def reloader() -> None:
            for i in range(1, reloads + 1):
                await reached[i].wait()
                write_plugin(plugins, "rl_counter", COUNTER.format(tag=f"g{i}"))
                await kernel.plugins.reload("rl_counter")
                finished[i].set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for chat in range(conversations):
                    tg.start_soon(conversation, chat)
                tg.start_soon(reloader)

        assert done == messages
        numbers = []
        generations = set()
        for target, reply in bot.sent:
            match = re.fullmatch(r"g(\d+) (\d+)", reply.plain_text)
            assert match is not None, reply.plain_text
            generations.add(int(match[1]))
            n = int(match[2])
            assert target.chat_id == f"chat-{n % conversations}"
            numbers.append(n)
        assert sorted(numbers) == list(range(messages))  # each answered exactly once
        assert kernel.plugins.info("rl_counter").reload_count == reloads
        assert await bot.receive("/count last") == [f"g{reloads} last"]
        # The first and the last generation answered (the pacing guarantees both).
        assert {0, reloads} <= generations
        assert not any("message dropped" in r.message for r in kernel.logging.buffer.records)


# ------------------------------------------------------------------ hot reload

HOT = """
from kernel import CommandSpec, hookimpl

async def hot(cmd):
    return "{tag}"

@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", hot)]
"""


def hot_code(tag: str, command: str = "rl_hot") -> str:
    return HOT.format(tag=tag, command=command)


def replace_file(path: Path, text: str) -> None:
    """Write `path` in one step, so the watcher never sees it half written."""
    staging = path.parent.parent.parent / "staging"
    staging.mkdir(exist_ok=True)
    (staging / path.name).write_text(text)
    os.replace(staging / path.name, path)


def watcher_running() -> bool:
    return any(t.get_name() == "nekobot-hot-reload" for t in asyncio.all_tasks())


@pytest.mark.anyio
async def test_hot_reload_follows_file_changes(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "rl_hot", hot_code("v1"))
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        events = record_events(kernel)
        records = record_logs(kernel)
        bot = MockBot(kernel)
        assert watcher_running()
        assert await bot.receive("/rl_hot") == ["v1"]

        async def answers(command: str, text: str) -> bool:
            return await bot.receive(command) == [text]

        # An edit is picked up.
        replace_file(path / "__init__.py", hot_code("v2"))
        await wait_until(lambda: answers("/rl_hot", "v2"))

        # A broken edit keeps the old code serving and is logged.
        replace_file(path / "__init__.py", hot_code("v3").replace("async def hot(cmd):", "def ("))

        await records.wait_for(lambda r: r.plugin == "rl_hot" and "SyntaxError" in r.message)
        await records.wait_for(lambda r: "hot reload of 'rl_hot' failed" in r.message)
        await events.wait_for(lambda e: e.type == "plugin.failed" and e.plugin == "rl_hot")
        assert await bot.receive("/rl_hot") == ["v2"]
        assert kernel.plugins.info("rl_hot").state is PluginState.ACTIVE

        # Fixed again: picked up.
        replace_file(path / "__init__.py", hot_code("v4"))
        await wait_until(lambda: answers("/rl_hot", "v4"))

        # A new plugin directory is loaded ...
        staged = write_plugin(tmp_path / "staging", "rl_hot_new", hot_code("fresh", "rl_hot_new"))
        os.replace(staged, plugins / "rl_hot_new")
        await wait_until(lambda: answers("/rl_hot_new", "fresh"))
        assert kernel.plugins.info("rl_hot_new").state is PluginState.ACTIVE

        # ... and a deleted one is unloaded and forgotten.
        shutil.rmtree(plugins / "rl_hot_new")

        async def forgotten() -> bool:
            return "rl_hot_new" not in kernel.plugins.records

        await wait_until(forgotten)
        assert await bot.receive("/rl_hot_new") == []
        assert await bot.receive("/rl_hot") == ["v4"]


@pytest.mark.anyio
async def test_hot_reload_setting_toggles_the_watcher(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "rl_toggle", hot_code("v1", command="rl_toggle"))
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        bot = MockBot(kernel)

        async def answers(text: str) -> bool:
            return await bot.receive("/rl_toggle") == [text]

        replace_file(path / "__init__.py", hot_code("v2", command="rl_toggle"))
        await wait_until(lambda: answers("v2"))

        await kernel.update_settings(hot_reload=False)
        assert not kernel.settings.hot_reload
        assert not watcher_running()
        reloads = kernel.plugins.info("rl_toggle").reload_count
        # Nothing watches any more (no watcher task, above): this edit is never seen ...
        replace_file(path / "__init__.py", hot_code("v3", command="rl_toggle"))
        assert await answers("v2")

        await kernel.update_settings(hot_reload=True)
        assert watcher_running()
        replace_file(path / "__init__.py", hot_code("v4", command="rl_toggle"))
        await wait_until(lambda: answers("v4"))
        # ... not even by the new watcher, which sees what changes once it runs: one
        # reload, for v4. (A watcher left running meanwhile would have made more.)
        assert kernel.plugins.info("rl_toggle").reload_count == reloads + 1
        assert "v3" not in bot.replies
    assert not watcher_running()


@pytest.mark.anyio
async def test_hot_reload_setting_persists_across_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_kernel(data, hot_reload=True) as kernel:
        assert watcher_running()
        await kernel.update_settings(hot_reload=False)
    async with running_kernel(data, hot_reload=True) as kernel:
        assert not kernel.settings.hot_reload
        assert not watcher_running()


@pytest.mark.anyio
async def test_hot_reload_skips_disabled_and_revives_fixed_plugins(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    off = write_plugin(plugins, "rl_hot_off", hot_code("off", command="rl_hot_off"))
    broken = write_plugin(plugins, "rl_hot_broken", "raise ImportError('not yet')\n")
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        bot = MockBot(kernel)
        await kernel.plugins.disable("rl_hot_off")
        assert kernel.plugins.info("rl_hot_broken").state is PluginState.FAILED

        # Both are edited; the disabled one is written first.
        replace_file(off / "__init__.py", hot_code("off2", command="rl_hot_off"))
        replace_file(broken / "__init__.py", hot_code("mended", command="rl_hot_broken"))

        async def mended() -> bool:
            return await bot.receive("/rl_hot_broken") == ["mended"]

        await wait_until(mended)
        assert kernel.plugins.info("rl_hot_broken").state is PluginState.ACTIVE
        info = kernel.plugins.info("rl_hot_off")
        assert (info.enabled, info.state) == (False, PluginState.DISPOSED)
        assert await bot.receive("/rl_hot_off") == []


RACER = """
from starlette.responses import PlainTextResponse
from kernel import RouteSpec, hookimpl

async def page(request):
    return PlainTextResponse("{tag}")

@hookimpl
def nekobot_routes():
    return [RouteSpec(p, page, methods=("GET",), public=True) for p in {paths!r}]

@hookimpl
async def nekobot_plugin_stop(ctx):
    release = (ctx.services.current(dict) or {{}}).get("release")
    if release is not None:
        await release.wait()
"""


@pytest.mark.anyio
async def test_a_key_claimed_while_the_old_generation_stops_fails_the_reload(
    tmp_path: Path,
) -> None:
    """Registries are checked when staging, but the old generation stops before the
    commit: another plugin may claim one of the new keys meanwhile."""
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_race_a", RACER.format(tag="a1", paths=["/rl/race_a"]))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        release = anyio.Event()
        kernel.services.provide("test", dict, {"release": release})
        write_plugin(
            plugins, "rl_race_a", RACER.format(tag="a2", paths=["/rl/race_a", "/rl/race_x"])
        )
        write_plugin(plugins, "rl_race_b", RACER.format(tag="b", paths=["/rl/race_x"]))
        await kernel.plugins.rescan()
        outcome: list[BaseException | None] = []

        async def reload_a() -> None:
            try:
                await kernel.plugins.reload("rl_race_a")
                outcome.append(None)
            except ReloadError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reload_a)

            async def retiring() -> bool:
                return kernel.plugins.info("rl_race_a").state is PluginState.UNLOADING

            await wait_until(retiring)
            kernel.services.withdraw("test", dict)  # b's stop must not wait
            await kernel.plugins.enable("rl_race_b")  # claims /rl/race_x meanwhile
            release.set()

        [error] = outcome
        assert isinstance(error, ReloadError)
        assert "already registered by plugin 'rl_race_b'" in error.message
        assert kernel.routes.get(("/rl/race_x", "GET")).owner == "rl_race_b"  # type: ignore[union-attr]
        assert [e.item[0] for e in kernel.routes.owned_by("rl_race_a")] == [("/rl/race_a", "GET")]
        assert kernel.plugins.info("rl_race_a").state is PluginState.ACTIVE
        assert await http_get(kernel, "/rl/race_a") == (200, "a1")
        assert await http_get(kernel, "/rl/race_x") == (200, "b")
        names = [n for n, _ in kernel.plugins.pm.list_name_plugin() if n.startswith("rl_race_a")]
        assert names == ["rl_race_a#1"]
        # Once b is gone, a's new version fits.
        await kernel.plugins.disable("rl_race_b")
        await kernel.plugins.reload("rl_race_a")
        assert await http_get(kernel, "/rl/race_x") == (200, "a2")


@pytest.mark.anyio
async def test_a_failed_reload_keeps_the_serving_manifest(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_manifest", main_code("v1"), manifest={"version": "1.0"})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        write_plugin(plugins, "rl_manifest", BROKEN["syntax error"], manifest={"version": "2.0"})
        with pytest.raises(ReloadError):
            await kernel.plugins.reload("rl_manifest")
        info = kernel.plugins.info("rl_manifest")
        assert (info.state, info.version) == (PluginState.ACTIVE, "1.0")

        write_plugin(plugins, "rl_manifest", main_code("v2"), raw_manifest="name = [")
        with pytest.raises(ReloadError):
            await kernel.plugins.reload("rl_manifest")
        info = kernel.plugins.info("rl_manifest")
        assert (info.state, info.version, info.error) == (PluginState.ACTIVE, "1.0", None)

        write_plugin(plugins, "rl_manifest", main_code("v2"), manifest={"version": "2.0"})
        assert (await kernel.plugins.reload("rl_manifest")).plugin.version == "2.0"


@pytest.mark.anyio
async def test_hot_reload_survives_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "rl_sturdy", hot_code("v1", command="rl_sturdy"))
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        bot = MockBot(kernel)
        real_reload = kernel.plugins.reload
        calls: list[str] = []

        async def flaky_reload(name: str, **options: bool) -> object:
            calls.append(name)
            if len(calls) == 1:
                raise OSError("disk hiccup")
            return await real_reload(name, **options)

        monkeypatch.setattr(kernel.plugins, "reload", flaky_reload)
        records = record_logs(kernel)
        replace_file(path / "__init__.py", hot_code("v2", command="rl_sturdy"))

        await records.wait_for(
            lambda r: r.level == "ERROR" and "hot reload of 'rl_sturdy' failed" in r.message
        )
        assert watcher_running()
        replace_file(path / "__init__.py", hot_code("v3", command="rl_sturdy"))

        async def answers() -> bool:
            return await bot.receive("/rl_sturdy") == ["v3"]

        await wait_until(answers)


@pytest.mark.anyio
async def test_hot_reload_follows_a_plugin_directory_that_is_removed_and_comes_back(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_root_a", hot_code("a", command="rl_root_a"))
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/rl_root_a") == ["a"]
        shutil.rmtree(plugins)

        async def forgotten() -> bool:
            return "rl_root_a" not in kernel.plugins.records

        await wait_until(forgotten)
        assert any("is gone" in r.message for r in kernel.logging.buffer.records)

        # The directory comes back whole (as a checkout or a copy would bring it).
        staged = tmp_path / "staged_plugins"
        write_plugin(staged, "rl_root_b", hot_code("b1", command="rl_root_b"))
        os.replace(staged, plugins)

        async def answers(text: str) -> bool:
            return await bot.receive("/rl_root_b") == [text]

        await wait_until(lambda: answers("b1"))
        # ... and is watched again.
        replace_file(plugins / "rl_root_b" / "__init__.py", hot_code("b2", command="rl_root_b"))
        await wait_until(lambda: answers("b2"))
        assert watcher_running()


ONCE = """
from starlette.responses import PlainTextResponse
from kernel import CommandSpec, RouteSpec, hookimpl

starts = 0

async def once(cmd):
    return "{tag}"

async def page(request):
    return PlainTextResponse("{tag}")

@hookimpl
def nekobot_commands():
    return [CommandSpec("rl_once", once)]

@hookimpl
def nekobot_routes():
    return [RouteSpec("/rl/once", page, public=True)]

@hookimpl
async def nekobot_plugin_start(ctx):
    global starts
    starts += 1
    if {fail}:
        raise RuntimeError("rl_once refuses")
"""


@pytest.mark.anyio
async def test_a_restore_that_fails_too_leaves_the_plugin_failed_and_clean(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    # v1 starts once only: brought back after v2's failure, it refuses too.
    write_plugin(plugins, "rl_once", ONCE.format(tag="v1", fail="starts > 1"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/rl_once") == ["v1"]
        write_plugin(plugins, "rl_once", ONCE.format(tag="v2", fail="True"))
        with pytest.raises(ReloadError, match="rl_once refuses"):
            await kernel.plugins.reload("rl_once")

        info = kernel.plugins.info("rl_once")
        assert (info.state, info.commands, info.routes) == (PluginState.FAILED, (), ())
        assert "rl_once refuses" in (info.error or "")
        assert kernel.commands.lookup("rl_once") is None
        assert kernel.routes.owned_by("rl_once") == []
        assert (await http_get(kernel, "/rl/once"))[0] == 404
        assert not [n for n, _ in kernel.plugins.pm.list_name_plugin() if n.startswith("rl_once")]
        assert "rl_once" not in kernel.plugins.module_owners
        assert "rl_once" not in sys.modules
        assert "rl_once" not in kernel.loader.finder.roots

        # Fixed: it loads again.
        write_plugin(plugins, "rl_once", ONCE.format(tag="v3", fail="False"))
        await kernel.plugins.reload("rl_once")
        assert await bot.receive("/rl_once") == ["v3"]


SWAP = """
from starlette.responses import PlainTextResponse
from kernel import RouteSpec, hookimpl

async def page(request):
    return PlainTextResponse("{tag}")

@hookimpl
def nekobot_routes():
    return [RouteSpec(p, page, methods=("GET",), public=True) for p in {paths!r}]

@hookimpl
async def nekobot_plugin_start(ctx):
    if {fail}:
        ctx.services.current(dict)["starting"].set()
        await ctx.services.current(dict)["release"].wait()
        raise RuntimeError("rl_swap refuses")
"""


@pytest.mark.anyio
async def test_a_key_claimed_while_the_new_generation_starts_is_not_taken_back(
    tmp_path: Path,
) -> None:
    """v2 drops /rl/swap_old; while v2 starts (and then fails), another plugin claims
    it. v1 cannot come back without taking it, so the plugin fails instead."""
    plugins = tmp_path / "plugins"
    v1_paths = ["/rl/swap", "/rl/swap_old"]
    write_plugin(plugins, "rl_swap", SWAP.format(tag="v1", paths=v1_paths, fail=False))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        starting, release = anyio.Event(), anyio.Event()
        kernel.services.provide("test", dict, {"starting": starting, "release": release})
        write_plugin(plugins, "rl_swap", SWAP.format(tag="v2", paths=["/rl/swap"], fail=True))
        write_plugin(
            plugins, "rl_swap_other", SWAP.format(tag="other", paths=["/rl/swap_old"], fail=False)
        )
        await kernel.plugins.rescan()
        errors: list[ReloadError] = []

        async def reload_swap() -> None:
            with pytest.raises(ReloadError) as caught:
                await kernel.plugins.reload("rl_swap")
            errors.append(caught.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reload_swap)
            await starting.wait()
            await kernel.plugins.enable("rl_swap_other")
            release.set()

        assert "rl_swap refuses" in errors[0].message
        assert kernel.routes.get(("/rl/swap_old", "GET")).owner == "rl_swap_other"  # type: ignore[union-attr]
        assert await http_get(kernel, "/rl/swap_old") == (200, "other")
        info = kernel.plugins.info("rl_swap")
        assert (info.state, info.routes) == (PluginState.FAILED, ())
        assert (await http_get(kernel, "/rl/swap"))[0] == 404


@pytest.mark.anyio
async def test_an_edit_before_a_returned_root_is_watched_again_is_not_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory comes back; its plugin is loaded; an edit lands before the new
    watch exists (the gap forced here): the first look after the watch starts sees it."""
    from kernel.reload import HotReloader

    plugins = tmp_path / "plugins"
    write_plugin(plugins, "rl_gap_a", hot_code("a", command="rl_gap_a"))
    original = HotReloader._apply
    edited: list[bool] = []

    async def apply_then_edit(self: HotReloader, dirs: list[Path], paths: object) -> None:
        await original(self, dirs, paths)  # type: ignore[arg-type]
        target = plugins / "rl_gap_c" / "__init__.py"
        if target.exists() and not edited:
            edited.append(True)
            replace_file(target, hot_code("c2", command="rl_gap_c"))

    monkeypatch.setattr(HotReloader, "_apply", apply_then_edit)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        bot = MockBot(kernel)
        shutil.rmtree(plugins)
        await wait_until(lambda: _forgotten(kernel, "rl_gap_a"))
        staged = tmp_path / "staged_plugins"
        write_plugin(staged, "rl_gap_c", hot_code("c1", command="rl_gap_c"))
        os.replace(staged, plugins)

        async def answers_c2() -> bool:
            return await bot.receive("/rl_gap_c") == ["c2"]

        await wait_until(answers_c2)
        assert edited


async def _forgotten(kernel: Kernel, name: str) -> bool:
    return name not in kernel.plugins.records


# -- what an admin sees, and uploads under the watcher ----------------------------------


@pytest.mark.anyio
async def test_a_failed_hot_reload_is_recorded_on_the_plugin_until_one_succeeds(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "rl_rec", hot_code("v1", command="rl_rec"))
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], hot_reload=True, reload_debounce_ms=50
    ) as kernel:
        assert kernel.plugins.info("rl_rec").last_reload_error is None
        replace_file(path / "__init__.py", "def (\n")

        async def recorded() -> bool:
            return kernel.plugins.info("rl_rec").last_reload_error is not None

        await wait_until(recorded)
        info = kernel.plugins.info("rl_rec")
        assert info.state is PluginState.ACTIVE and info.error is None
        assert info.last_reload_error is not None
        assert "SyntaxError" in info.last_reload_error.message
        assert "previous version kept" in info.last_reload_error.message

        replace_file(path / "__init__.py", hot_code("v2", command="rl_rec"))

        async def cleared() -> bool:
            return kernel.plugins.info("rl_rec").last_reload_error is None

        await wait_until(cleared)
        assert kernel.plugins.info("rl_rec").reload_count == 1


@pytest.mark.anyio
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
async def test_an_upload_with_enable_is_one_generation_under_the_watcher(
    tmp_path: Path, overwrite: bool
) -> None:
    from tests.builtin_plugins.plugin_admin.test_upload import command_code, plugin_zip, upload
    from tests.plugin_factory import purge_modules

    purge_modules("rl_up")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    if overwrite:
        write_plugin(plugins, "rl_up", hot_code("old", command="rl_up"))
    async with running_kernel(
        tmp_path / "data",
        plugin_dirs=[plugins],
        builtin_plugins=["api", "auth", "plugin_admin"],
        hot_reload=True,
        reload_debounce_ms=50,
    ) as kernel:
        reloader = kernel.hot_reloader
        assert reloader is not None
        auth = kernel.services.current(AuthService)
        assert auth is not None
        token, _ = auth.issue("nekobot")
        transport = httpx.ASGITransport(app=kernel.asgi_app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://localhost",
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            r = await upload(
                client,
                plugin_zip("rl_up", command_code("rl_up", "new")),
                enable="true",
                overwrite="true" if overwrite else "false",
            )
        assert r.is_success, r.text
        first = kernel.plugins.info("rl_up")
        assert first.state is PluginState.ACTIVE

        async def watcher_saw_it() -> bool:
            return any(name == "rl_up" for name, _ in reloader.outcomes)

        # The watcher saw the files the upload put there, and left the plugin alone.
        await wait_until(watcher_saw_it)
        assert [o for n, o in reloader.outcomes if n == "rl_up"] == ["unchanged"]
        after = kernel.plugins.info("rl_up")
        assert after.reload_count == first.reload_count
        assert after.loaded_at == first.loaded_at
        bot = MockBot(kernel)
        assert await bot.receive("/rl_up") == ["new"]
        # An edit afterwards is still picked up.
        replace_file(plugins / "rl_up" / "__init__.py", command_code("rl_up", "edited"))

        async def reloaded() -> bool:
            return ("rl_up", "reloaded") in reloader.outcomes

        await wait_until(reloaded)
        assert await bot.receive("/rl_up") == ["edited"]
