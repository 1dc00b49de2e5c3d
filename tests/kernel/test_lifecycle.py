"""Tests of kernel.lifecycle: plugin state transitions, the Scope and the Gate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from kernel import DisposedError, KernelEvent, PluginContext, PluginLoadError, PluginState
from kernel.kernel import Kernel
from kernel.lifecycle import Gate, GateClosedError, Scope
from kernel.testing import PATIENCE, MockBot, record_logs, running_kernel
from tests.plugin_factory import write_plugin

# Plugins report what they see through a list the test provides as the `probe` service.
PROBED = """
import anyio
from kernel import CommandSpec, hookimpl

def probe(ctx):
    found = ctx.services.current(list)
    return found if found is not None else []

async def ping(cmd):
    return "pong {tag}"

@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", ping)]

@hookimpl
async def nekobot_plugin_start(ctx):
    probe(ctx).append(("start", ctx.kernel.plugins.info(ctx.name).state))
    {start}

@hookimpl
async def nekobot_plugin_stop(ctx):
    probe(ctx).append(("stop", ctx.kernel.plugins.info(ctx.name).state))
"""


def probed(command: str, *, tag: str = "v1", start: str = "pass") -> str:
    return PROBED.format(command=command, tag=tag, start=start)


def state(kernel: Kernel, name: str) -> PluginState:
    return kernel.plugins.info(name).state


def provide_probe(kernel: Kernel) -> list[Any]:
    probe: list[Any] = []
    kernel.services.provide("tests", list, probe)
    return probe


def event_log(kernel: Kernel) -> list[KernelEvent]:
    events: list[KernelEvent] = []
    kernel.subscribe_events(events.append)
    return events


# ------------------------------------------------------------------ transitions


@pytest.mark.anyio
async def test_enable_goes_pending_loading_active(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        probe = provide_probe(kernel)
        events = event_log(kernel)
        write_plugin(plugins, "lc_alpha", probed("lc_ping"))
        assert await kernel.plugins.rescan() == ["lc_alpha"]
        assert state(kernel, "lc_alpha") is PluginState.PENDING
        assert kernel.commands.lookup("lc_ping") is None

        result = await kernel.plugins.enable("lc_alpha")

        assert probe == [("start", PluginState.LOADING)]
        assert result.plugin.state is PluginState.ACTIVE
        assert state(kernel, "lc_alpha") is PluginState.ACTIVE
        assert kernel.plugins.info("lc_alpha").enabled
        assert [e.type for e in events if e.plugin == "lc_alpha"] == ["plugin.enabled"]
        assert await MockBot(kernel).receive("/lc_ping") == ["pong v1"]


@pytest.mark.anyio
async def test_disable_goes_unloading_disposed(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        probe = provide_probe(kernel)
        events = event_log(kernel)
        write_plugin(plugins, "lc_beta", probed("lc_beta_ping"))
        await kernel.plugins.rescan()
        await kernel.plugins.enable("lc_beta")
        bot = MockBot(kernel)
        assert await bot.receive("/lc_beta_ping") == ["pong v1"]

        result = await kernel.plugins.disable("lc_beta")

        assert probe[-1] == ("stop", PluginState.UNLOADING)
        assert result.plugin.state is PluginState.DISPOSED
        assert not result.plugin.enabled
        assert state(kernel, "lc_beta") is PluginState.DISPOSED
        assert kernel.commands.lookup("lc_beta_ping") is None
        assert await bot.receive("/lc_beta_ping") == []
        assert "lc_beta" not in kernel.loader.finder.roots
        assert [e.type for e in events if e.plugin == "lc_beta"] == [
            "plugin.enabled",
            "plugin.disabled",
        ]
        # Disabling again changes nothing and emits nothing.
        again = await kernel.plugins.disable("lc_beta")
        assert not again.changed
        assert len([e for e in events if e.plugin == "lc_beta"]) == 2

        # And it comes back.
        await kernel.plugins.enable("lc_beta")
        assert state(kernel, "lc_beta") is PluginState.ACTIVE
        assert await bot.receive("/lc_beta_ping") == ["pong v1"]


@pytest.mark.anyio
async def test_import_error_fails_then_reload_after_fix_activates(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lc_gamma", "raise RuntimeError('gamma is broken')\n")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        info = kernel.plugins.info("lc_gamma")
        assert info.state is PluginState.FAILED
        assert info.error is not None and "gamma is broken" in info.error
        assert any(
            r.plugin == "lc_gamma" and r.level == "ERROR" and "gamma is broken" in r.message
            for r in kernel.logging.buffer.records
        )
        with pytest.raises(PluginLoadError, match="gamma is broken"):
            await kernel.plugins.enable("lc_gamma")
        assert state(kernel, "lc_gamma") is PluginState.FAILED
        assert "lc_gamma" not in kernel.plugins.pm.list_name_plugin()

        write_plugin(plugins, "lc_gamma", probed("lc_gamma_ping", tag="fixed"))
        result = await kernel.plugins.reload("lc_gamma")

        assert result.plugin.state is PluginState.ACTIVE
        assert result.plugin.error is None
        assert await MockBot(kernel).receive("/lc_gamma_ping") == ["pong fixed"]


@pytest.mark.anyio
async def test_start_raising_fails_and_withdraws_everything(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        probe = provide_probe(kernel)
        code = probed(
            "lc_delta_ping",
            start="ctx.on_dispose(lambda: probe(ctx).append('disposed'))\n"
            "    raise ValueError('no start for you')",
        )
        write_plugin(plugins, "lc_delta", code)
        await kernel.plugins.rescan()
        routes_before = len(kernel.asgi_app.routes)

        with pytest.raises(PluginLoadError, match="no start for you"):
            await kernel.plugins.enable("lc_delta")

        info = kernel.plugins.info("lc_delta")
        assert info.state is PluginState.FAILED
        assert info.error is not None and "ValueError: no start for you" in info.error
        # What the failed start acquired was disposed, and nothing stays registered.
        assert probe[0] == ("start", PluginState.LOADING)
        assert probe[-1] == "disposed"
        assert kernel.commands.lookup("lc_delta_ping") is None
        assert kernel.commands.owned_by("lc_delta") == []
        assert len(kernel.asgi_app.routes) == routes_before
        assert not [n for n, _ in kernel.plugins.pm.list_name_plugin() if n.startswith("lc_delta")]
        assert all(p != "lc_delta" for idx in kernel.plugins.hook_index.values() for p, _, _ in idx)
        bot = MockBot(kernel)
        assert await bot.receive("/lc_delta_ping") == []

        write_plugin(plugins, "lc_delta", probed("lc_delta_ping", tag="healed"))
        await kernel.plugins.reload("lc_delta")
        assert state(kernel, "lc_delta") is PluginState.ACTIVE
        assert await bot.receive("/lc_delta_ping") == ["pong healed"]


@pytest.mark.anyio
async def test_start_timing_out_fails(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lc_slowstart", probed("lc_slow", start="await anyio.sleep_forever()"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins], hook_timeout=0.2) as kernel:
        info = kernel.plugins.info("lc_slowstart")
        assert info.state is PluginState.FAILED
        assert info.error is not None and "timed out" in info.error


# ------------------------------------------------------------------ the scope

SCOPED = """
import contextlib

import anyio
from kernel import hookimpl

@contextlib.asynccontextmanager
async def resource(probe):
    probe.append("enter resource")
    try:
        yield "the resource"
    finally:
        probe.append("exit resource")

async def worker(probe, ready):
    probe.append("task running")
    ready.set()
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        probe.append("task cancelled")
        raise

async def hang():
    await anyio.sleep_forever()

@hookimpl
async def nekobot_plugin_start(ctx):
    probe = ctx.services.current(list)
    if probe is None:
        return
    probe.append(ctx)
    ready = anyio.Event()
    ctx.on_dispose(lambda: probe.append("callback 1"))
    value = await ctx.enter_async_context(resource(probe))
    probe.append(value)
    async def second():
        probe.append("callback 2")
    ctx.on_dispose(second)
    ctx.on_dispose(hang, name="hanging step")
    ctx.on_dispose(lambda: 1 / 0, name="crashing step")
    ctx.start_task(worker, probe, ready, name="worker")
    await ready.wait()
"""


@pytest.mark.anyio
async def test_scope_disposal_on_disable(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    # Short enough to wait out the hanging step, long enough for every other step on a
    # loaded machine.
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins], hook_timeout=1) as kernel:
        probe = provide_probe(kernel)
        write_plugin(plugins, "lc_scoped", SCOPED)
        await kernel.plugins.rescan()
        await kernel.plugins.enable("lc_scoped")
        ctx = probe.pop(0)
        assert probe == ["enter resource", "the resource", "task running"]
        scope = ctx.scope
        assert scope.live_tasks == 1
        probe.clear()

        with anyio.fail_after(PATIENCE):  # the hanging callback is bounded by hook_timeout
            await kernel.plugins.disable("lc_scoped")

        # Tasks are cancelled first, then callbacks run last-registered first; a step
        # that hangs or raises is logged and the rest still run.
        assert probe == ["task cancelled", "callback 2", "exit resource", "callback 1"]
        assert scope.live_tasks == 0
        messages = [r.message for r in kernel.logging.buffer.records if r.plugin == "lc_scoped"]
        assert any("'hanging step' timed out" in m for m in messages)
        assert any("'crashing step' failed" in m for m in messages)

        async def nothing() -> None:
            pass

        with pytest.raises(DisposedError):
            ctx.start_task(nothing)
        with pytest.raises(DisposedError):
            ctx.on_dispose(nothing)
        with pytest.raises(DisposedError):
            await ctx.enter_async_context(NeverEntered())
        with pytest.raises(DisposedError):
            await ctx.emit("lc.event")


class NeverEntered:
    async def __aenter__(self) -> None:
        raise AssertionError("a disposed scope entered a context")

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.mark.anyio
async def test_scope_disposed_on_reload_and_shutdown(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins], hook_timeout=1) as kernel:
        probe = provide_probe(kernel)
        write_plugin(plugins, "lc_scoped2", SCOPED)
        await kernel.plugins.rescan()
        await kernel.plugins.enable("lc_scoped2")
        first_ctx = probe.pop(0)
        probe.clear()
        await kernel.plugins.reload("lc_scoped2")
        # The old generation is disposed before the new one starts.
        assert probe[:4] == ["task cancelled", "callback 2", "exit resource", "callback 1"]
        second_ctx = probe[4]
        assert isinstance(second_ctx, PluginContext) and second_ctx is not first_ctx
        assert first_ctx.scope.closed and not second_ctx.scope.closed
        probe.clear()
    # Leaving the kernel disposes the active generation too.
    assert probe == ["task cancelled", "callback 2", "exit resource", "callback 1"]
    assert second_ctx.scope.closed


@pytest.mark.anyio
async def test_scope_unit_behaviour() -> None:
    log = logging.LoggerAdapter(logging.getLogger("nekobot.tests.scope"), {})
    order: list[str] = []
    async with anyio.create_task_group() as tg:
        scope = Scope("unit", tg, log, step_timeout=0.1)

        async def crash() -> None:
            raise RuntimeError("task crash is logged, not raised")

        released = anyio.Event()

        async def stubborn() -> None:
            # Ignores cancellation until released (after the disposal): disposal gives
            # up on it after step_timeout.
            with anyio.CancelScope(shield=True):
                await released.wait()
            order.append("stubborn done")

        handle = scope.start_task(crash)
        await handle.wait()
        assert scope.live_tasks == 0
        scope.start_task(stubborn)
        scope.on_dispose(lambda: order.append("a"))
        scope.on_dispose(lambda: order.append("b"))
        with anyio.fail_after(PATIENCE):
            await scope.dispose()
        assert order == ["b", "a"]
        await scope.dispose()  # idempotent: nothing runs twice
        assert order == ["b", "a"]
        assert scope.closed
        with pytest.raises(DisposedError):
            scope.on_dispose(lambda: None)
        released.set()
    assert order == ["b", "a", "stubborn done"]


async def _call_until(gate: Gate, label: str, leave: anyio.Event, log: list[str]) -> None:
    """Be inside `gate` (in a task of its own) until `leave` is set or the call is cancelled."""
    call = gate.enter(label)
    try:
        with call.cancel_scope:
            await leave.wait()
    finally:
        gate.leave(call)
    log.append(f"{label} {'cancelled' if call.cancel_scope.cancelled_caught else 'left'}")


@pytest.mark.anyio
async def test_gate_waits_for_calls_in_flight() -> None:
    gate = Gate()
    with pytest.raises(GateClosedError):
        gate.enter()  # a gate starts closed
    gate.open()
    leave, log, done = anyio.Event(), [], []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_call_until, gate, "a", leave, log)
        await anyio.wait_all_tasks_blocked()
        assert gate.in_flight == 1

        async def close() -> None:
            done.append(await gate.close(5))

        tg.start_soon(close)
        await anyio.wait_all_tasks_blocked()
        assert gate.closed and not done
        with pytest.raises(GateClosedError):
            gate.enter()
        leave.set()
    assert done == [True]
    assert log == ["a left"]
    assert gate.in_flight == 0


@pytest.mark.anyio
async def test_gate_cancels_calls_that_outlive_the_wait() -> None:
    gate = Gate(open=True)
    never, log = anyio.Event(), []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_call_until, gate, "slow b", never, log)
        tg.start_soon(_call_until, gate, "slow a", never, log)
        await anyio.wait_all_tasks_blocked()
        assert await gate.close(0.01) is False
        assert gate.in_flight == 2 and log == []
        assert gate.cancel() == ["slow a", "slow b"]
        assert gate.cancel() == []  # once
        assert await gate.wait(5) is True
    assert sorted(log) == ["slow a cancelled", "slow b cancelled"]


@pytest.mark.anyio
async def test_a_call_retiring_its_own_gate_is_neither_awaited_nor_cancelled() -> None:
    """A command that reloads its own plugin must not wait for itself (nor be cancelled,
    which would cancel the reload it is running)."""
    gate = Gate(open=True)
    never, log = anyio.Event(), []
    own = gate.enter("own")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_call_until, gate, "other", never, log)
            await anyio.wait_all_tasks_blocked()
            with own.cancel_scope:
                assert await gate.close(0.01) is False  # waits for "other" only
                assert gate.cancel() == ["other"]
                assert await gate.wait(5) is True  # "own" is still inside
                assert gate.in_flight == 1
                await anyio.lowlevel.checkpoint()
            assert not own.cancel_scope.cancelled_caught and not own.cancelled
    finally:
        gate.leave(own)
    assert log == ["other cancelled"]
    # Outside any call, the same gate with a call in another task is waited for.
    gate2 = Gate(open=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_call_until, gate2, "c", never, log)
        await anyio.wait_all_tasks_blocked()
        assert await gate2.close(0.01) is False
        gate2.cancel()


ORDERED = """
from kernel import hookimpl

@hookimpl
async def nekobot_plugin_stop(ctx):
    ctx.services.current(list).append(ctx.name)
"""


@pytest.mark.anyio
async def test_shutdown_retires_the_last_loaded_first(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    probe: list[str] = []
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], builtin_plugins=["api", "help"]
    ) as kernel:
        kernel.services.provide("tests", list, probe)
        for name in ("lc_order_c", "lc_order_a", "lc_order_b"):
            write_plugin(plugins, name, ORDERED)
            await kernel.plugins.rescan()
            await kernel.plugins.enable(name)
        await kernel.plugins.reload("lc_order_c")  # now the most recently loaded
        probe.clear()
        api_gen = kernel.plugins.records["api"].generation
        help_gen = kernel.plugins.records["help"].generation
        assert api_gen is not None and help_gen is not None
        scopes = {"api": api_gen.scope, "help": help_gen.scope}
        closed_when: dict[str, list[str]] = {}

        def watch(name: str) -> None:
            closed_when[name] = list(probe)

        for name, scope in scopes.items():
            assert scope is not None
            scope.on_dispose(lambda name=name: watch(name))  # type: ignore[misc]
    assert probe == ["lc_order_c", "lc_order_b", "lc_order_a"]
    # Builtins were loaded first, so they go after the user plugins; the essential last.
    assert closed_when["help"] == probe
    assert closed_when["api"] == probe


@pytest.mark.anyio
async def test_provide_after_disposal_registers_nothing(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lc_provider", probed("lc_provider"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        gen = kernel.plugins.records["lc_provider"].generation
        assert gen is not None and gen.ctx is not None
        ctx = gen.ctx
        await kernel.plugins.disable("lc_provider")
        with pytest.raises(DisposedError):
            ctx.provide(object, object())
        # Nothing would ever withdraw it.
        assert kernel.services.current(object) is None


@pytest.mark.anyio
async def test_a_context_entered_while_the_scope_is_disposed_is_exited() -> None:
    log = logging.LoggerAdapter(logging.getLogger("nekobot.tests.scope"), {})
    order: list[str] = []
    entering, proceed = anyio.Event(), anyio.Event()

    class Slow:
        async def __aenter__(self) -> None:
            entering.set()
            await proceed.wait()
            order.append("entered")

        async def __aexit__(self, *exc: object) -> None:
            order.append("exited")

    async with anyio.create_task_group() as tg:
        scope = Scope("unit", tg, log, step_timeout=0.1)
        errors: list[BaseException] = []

        async def enter() -> None:  # e.g. a handler still running after its gate timed out
            try:
                await scope.enter_async_context(Slow())
            except DisposedError as exc:
                errors.append(exc)

        tg.start_soon(enter)
        await entering.wait()
        await scope.dispose()
        proceed.set()
    assert order == ["entered", "exited"]
    assert len(errors) == 1


HANGING = """
import anyio
from kernel import CommandSpec, hookimpl

async def hang(cmd):
    cmd.ctx.services.current(dict)["started"].set()
    await anyio.Event().wait()  # never set: only a cancellation ends this call

async def reload_me(cmd):
    await cmd.ctx.kernel.plugins.reload(cmd.ctx.name)
    return "reloaded"

@hookimpl
def nekobot_commands():
    return [CommandSpec("lc_hang", hang, timeout=3600), CommandSpec("lc_reload_me", reload_me)]

@hookimpl
async def nekobot_on_event(event, ctx):
    if event.type == "lc.hang":
        ctx.services.current(dict)["started"].set()
        await anyio.Event().wait()
"""


def _messages(kernel: Kernel, level: str) -> list[str]:
    return [r.message for r in kernel.logging.buffer.records if r.level == level]


@pytest.mark.anyio
@pytest.mark.parametrize("hook", [False, True])
async def test_a_call_outliving_the_gate_timeout_is_cancelled(tmp_path: Path, hook: bool) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lc_hang", HANGING)
    # Each call's own time bound is far longer than the gate's wait.
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], handler_timeout=0.1, hook_timeout=3600
    ) as kernel:
        started = anyio.Event()
        kernel.services.provide("tests", dict, {"started": started})
        bot = MockBot(kernel)
        replies: list[list[str]] = []

        async def receive() -> None:
            if hook:
                await kernel.emit(KernelEvent("lc.hang", {}))
            else:
                replies.append(await bot.receive("/lc_hang"))

        with anyio.fail_after(PATIENCE):  # a hang fails the test instead of stalling the suite
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                await started.wait()
                await kernel.plugins.disable("lc_hang")
        # The caller got the pipeline's usual failure handling, not a hang.
        assert replies == ([] if hook else [["/lc_hang failed."]])
        assert state(kernel, "lc_hang") is PluginState.DISPOSED
        warnings = _messages(kernel, "WARNING")
        assert any("1 call(s) into 'lc_hang#1' still running" in m for m in warnings), warnings
        label = "nekobot_on_event" if hook else "command 'lc_hang:lc_hang'"
        errors = _messages(kernel, "ERROR")
        assert any(f"cancelled {label} of plugin 'lc_hang'" in m for m in errors), errors


@pytest.mark.anyio
async def test_a_command_reloading_its_own_plugin_is_not_cancelled(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lc_hang", HANGING)
    # A gate timeout far longer than the test: waiting for itself would fail it by time.
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], handler_timeout=3600
    ) as kernel:
        bot = MockBot(kernel)
        with anyio.fail_after(PATIENCE):
            assert await bot.receive("/lc_reload_me") == ["reloaded"]
        assert kernel.plugins.info("lc_hang").reload_count == 1
        assert state(kernel, "lc_hang") is PluginState.ACTIVE
        assert not any("cancelled" in m for m in _messages(kernel, "ERROR"))


RELOADER = """
from kernel import CommandSpec, hookimpl

async def reload_other(cmd):
    await cmd.ctx.kernel.plugins.reload("lc_slow_stop")
    return "reloaded"

@hookimpl
def nekobot_commands():
    return [CommandSpec("lc_reload_other", reload_other, timeout=3600)]
"""

SLOW_STOP = """
from kernel import CommandSpec, hookimpl

async def ping(cmd):
    return "pong"

@hookimpl
def nekobot_commands():
    return [CommandSpec("lc_ping", ping)]

@hookimpl
async def nekobot_plugin_stop(ctx):
    probe = ctx.services.current(dict)
    probe["stopping"].set()
    await probe["release"].wait()
"""


@pytest.mark.anyio
async def test_an_operation_in_a_cancelled_call_still_completes(tmp_path: Path) -> None:
    """A command of lc_reloader reloads lc_slow_stop; lc_reloader is disabled meanwhile
    and its call, outliving the wait, is cancelled. The reload it was running must not
    stop half-way (lc_slow_stop retired, its gate closed, nothing serving)."""
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "lc_reloader", RELOADER)
    write_plugin(plugins, "lc_slow_stop", SLOW_STOP)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], handler_timeout=0.1, hook_timeout=3600
    ) as kernel:
        probe = {"stopping": anyio.Event(), "release": anyio.Event()}
        kernel.services.provide("tests", dict, probe)
        bot = MockBot(kernel)
        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bot.receive, "/lc_reload_other")
                await probe["stopping"].wait()  # the reload is in lc_slow_stop's stop hook
                await kernel.plugins.disable("lc_reloader")  # cancels the command's call
                errors = _messages(kernel, "ERROR")
                assert any("cancelled command 'lc_reloader:lc_reload_other'" in m for m in errors)
                probe["release"].set()
        assert state(kernel, "lc_slow_stop") is PluginState.ACTIVE
        assert kernel.plugins.info("lc_slow_stop").reload_count == 1
        assert await bot.receive("/lc_ping", chat_id="other") == ["pong"]


CONTEXT_USER = """
from kernel import hookimpl

@hookimpl
async def nekobot_plugin_start(ctx):
    seen = ctx.services.current(list)
    seen.append(ctx)
    kept = ctx.store  # a store object the plugin keeps

    async def on_dispose():
        # Disposal is not over yet: the context (and a kept store) still work for clean-up.
        await kept.kv_set("bye", True)
        seen.append(
            (ctx.data_dir.name, ctx.services.current(list) is seen, ctx.kernel.id, kept)
        )

    ctx.on_dispose(on_dispose)
"""


@pytest.mark.anyio
async def test_the_context_works_during_disposal_and_refuses_after(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        probe = provide_probe(kernel)
        write_plugin(plugins, "lc_ctx_user", CONTEXT_USER)
        await kernel.plugins.rescan()
        await kernel.plugins.enable("lc_ctx_user")
        await kernel.plugins.disable("lc_ctx_user")
        await kernel.plugins.enable("lc_ctx_user")
        old_ctx, during = probe[0], probe[1]
        assert isinstance(old_ctx, PluginContext)
        assert during[:3] == ("lc_ctx_user", True, kernel.id)
        assert await kernel.storage.plugin_store("lc_ctx_user").kv_get("bye") is True
        assert old_ctx.scope.disposed
        for attribute in ("store", "data_dir", "services", "kernel", "http"):
            with pytest.raises(DisposedError, match="lc_ctx_user"):
                getattr(old_ctx, attribute)
        # A store object kept from the old generation refuses too.
        with pytest.raises(DisposedError, match="lc_ctx_user"):
            await during[3].kv_get("bye")
        # The current generation's context is unaffected.
        new_ctx = probe[2]
        assert isinstance(new_ctx, PluginContext) and new_ctx is not old_ctx
        assert new_ctx.kernel is kernel and new_ctx.services.current(list) is probe


EMITTER = """
import anyio
from kernel import CommandSpec, PluginState, hookimpl

async def slow(cmd):
    kernel = cmd.ctx.kernel
    await cmd.ctx.emit("zzlc.ping")
    # Still running once the event's handler is retiring this plugin (its gate is
    # closed, its reload waits for the calls inside) ...
    with anyio.fail_after(30):
        while kernel.plugins.info("zzlc_emitter").state is not PluginState.UNLOADING:
            await anyio.sleep(0.01)  # a state, with no event to wait on
    # ... and a while longer: a window for a reload that wrongly does not wait to
    # finish first. A slow machine can only narrow it, never fail a right kernel.
    await anyio.sleep(0.3)
    cmd.ctx.log.info("zzlc command done")
    return "done"

@hookimpl
def nekobot_commands():
    return [CommandSpec("zzlc_slow", slow)]
"""

EVENT_RELOADER = """
from kernel import hookimpl

@hookimpl
async def nekobot_on_event(ctx, event):
    if event.type == "zzlc.ping":
        await ctx.kernel.plugins.reload("zzlc_emitter")
        ctx.log.info("zzlc reloaded")
"""


@pytest.mark.anyio
async def test_an_event_handler_is_not_inside_the_emitters_call(tmp_path: Path) -> None:
    """A handler of an event that a command emitted, reloading that command's plugin,
    waits for the command like any other retirement (it is not the command's own call)."""
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "zzlc_emitter", EMITTER)
    write_plugin(plugins, "zzlc_reloader", EVENT_RELOADER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        records = record_logs(kernel)
        assert await MockBot(kernel).receive("/zzlc_slow") == ["done"]
        await records.wait_for(lambda r: r.message == "zzlc reloaded")  # the handler runs apart
        order = [r.message for r in records.items if r.message.startswith("zzlc ")]
        assert order == ["zzlc command done", "zzlc reloaded"]
