"""Tests of kernel.events: the message pipeline, its ordering, permissions and isolation."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from kernel import KernelEvent, PluginLoadError, PluginState, Sender
from kernel.kernel import Kernel
from kernel.testing import PATIENCE, Collected, MockBot, record_logs, running_kernel
from tests.plugin_factory import write_plugin


def module_of(kernel: Kernel, name: str) -> ModuleType:
    """The module of a plugin's active generation."""
    gen = kernel.plugins.records[name].generation
    assert gen is not None
    return gen.imported.module


def plugin_errors(kernel: Kernel, plugin: str) -> list[str]:
    """Messages of the ERROR records attributed to `plugin`."""
    return [
        r.message
        for r in kernel.logging.buffer.records
        if r.plugin == plugin and r.level == "ERROR"
    ]


# -- ordering and concurrency ---------------------------------------------------------

_ORDER = """
import random

import anyio

from kernel import CommandSpec, hookimpl

seen = []
started = None  # set by the test: an anyio.Event
release = None  # set by the test: an anyio.Event


async def record(cmd):
    # Work of random length (waiting for nothing): it shuffles how the handlers of
    # concurrent messages interleave, which the order of each conversation must survive.
    await anyio.sleep(random.uniform(0, 0.01))
    seen.append((cmd.event.chat_id, cmd.args))
    await anyio.sleep(random.uniform(0, 0.01))
    return "done " + cmd.args


async def slow(cmd):
    started.set()
    with anyio.fail_after(30):
        await release.wait()
    return "slow done"


async def fast(cmd):
    release.set()
    return "fast done"


@hookimpl
def nekobot_commands():
    return [
        CommandSpec("record", record),
        CommandSpec("slow", slow),
        CommandSpec("fast", fast),
    ]
"""


@pytest.mark.anyio
async def test_messages_of_one_conversation_are_handled_in_order(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "evt_order", _ORDER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel:
        bot = MockBot(kernel)
        mod = module_of(kernel, "evt_order")
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(partial(bot.receive, f"/record {i}", chat_id="a" if i % 2 else "b"))
        for chat in ("a", "b"):
            got = [int(arg) for c, arg in mod.seen if c == chat]
            assert got == sorted(got) and len(got) == 10, chat
        # Replies of one conversation go out in order too.
        for chat in ("a", "b"):
            texts = [r.plain_text for t, r in bot.sent if t.chat_id == chat]
            numbers = [int(t.split()[1]) for t in texts]
            assert numbers == sorted(numbers)
        assert len(bot.sent) == 20


@pytest.mark.anyio
async def test_a_slow_conversation_does_not_delay_another(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "evt_order", _ORDER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel:
        bot = MockBot(kernel)
        mod = module_of(kernel, "evt_order")
        mod.started, mod.release = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(bot.receive, "/slow", chat_id="A"))
            await mod.started.wait()
            # If conversations were serialized, /fast would wait for /slow, which waits
            # for /fast: the slow handler would time out instead of finishing.
            assert await bot.receive("/fast", chat_id="B") == ["fast done"]
        assert [r for t, r in ((t.chat_id, r.plain_text) for t, r in bot.sent)] == [
            "fast done",
            "slow done",
        ]
        # Within one conversation the same pair is serialized: /fast waits behind /slow.
        mod.started, mod.release = anyio.Event(), anyio.Event()
        bot.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(bot.receive, "/slow", chat_id="C"))
            await mod.started.wait()
            mod.release.set()  # otherwise /fast, queued behind /slow, could never release it
            await bot.receive("/fast", chat_id="C")
        assert bot.replies == ["slow done", "fast done"]


# -- permissions and platforms ----------------------------------------------------------

_SCOPED = """
from kernel import CommandSpec, hookimpl


async def secret(cmd):
    return "secret ok"


async def elsewhere(cmd):
    return "elsewhere ok"


async def here(cmd):
    return "here ok"


@hookimpl
def nekobot_commands():
    return [
        CommandSpec("secret", secret, permission="admin"),
        CommandSpec("elsewhere", elsewhere, platforms=("other",)),
        CommandSpec("here", here, platforms=("mock", "other")),
    ]
"""


@pytest.mark.anyio
async def test_admin_permission(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "evt_scoped", _SCOPED)
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel:
        bot = MockBot(kernel)
        [denied] = await bot.receive("/secret")
        assert "not allowed" in denied and denied != "secret ok"
        await kernel.update_bot_config(admin_ids=["user-1"])
        assert await bot.receive("/secret") == ["secret ok"]
        other = Sender("user-2", "Other")
        [denied] = await bot.receive("/secret", sender=other)
        assert "not allowed" in denied
        await kernel.update_bot_config(admin_ids=["mock:user-2"])
        assert await bot.receive("/secret", sender=other) == ["secret ok"]
        [denied] = await bot.receive("/secret")
        assert "not allowed" in denied
        # A platform may vouch for a sender itself.
        assert await bot.receive("/secret", sender=Sender("x", is_admin=True)) == ["secret ok"]


@pytest.mark.anyio
async def test_platform_scope(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "evt_scoped", _SCOPED)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[tmp_path / "plugins"], builtin_plugins=["help"]
    ) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/elsewhere") == []
        assert await bot.receive("/evt_scoped:elsewhere") == []
        assert await bot.receive("/here") == ["here ok"]
        [listing] = await bot.receive("/help")
        assert "/here" in listing and "/elsewhere" not in listing

        class OtherBot(MockBot):
            platform = "other"

        other = OtherBot(kernel, instance="other-1")
        assert await other.receive("/elsewhere") == ["elsewhere ok"]
        assert await other.receive("/here") == ["here ok"]


# -- non-command messages -------------------------------------------------------------

_LISTENER = """
import anyio

from kernel import CommandSpec, hookimpl

answered = None  # set by the test: an anyio.Event, set once this plugin answered
after = None  # set by the test: an anyio.Event to wait for before answering


@hookimpl
async def nekobot_on_message(event, ctx):
    if after is not None:
        with anyio.fail_after(30):
            await after.wait()
    if answered is not None:
        answered.set()
    if event.text == "quiet":
        return None
    return "{name} heard " + event.text
"""

_STEPS = """
from kernel import CommandSpec, hookimpl


async def steps(cmd):
    await cmd.send("step 1")
    await cmd.send("step 2")
    return "finished"


@hookimpl
def nekobot_commands():
    return [CommandSpec("steps", steps)]
"""


@pytest.mark.anyio
async def test_non_command_messages_go_to_on_message_in_plugin_name_order(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    for name in ("evt_listen_b", "evt_listen_a"):
        write_plugin(plugins, name, _LISTENER.replace("{name}", name))
    write_plugin(plugins, "evt_steps", _STEPS)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        # The alphabetically first plugin answers last; the replies are still ordered.
        first, second = module_of(kernel, "evt_listen_a"), module_of(kernel, "evt_listen_b")
        second.answered = first.after = anyio.Event()
        assert await bot.receive("hello") == [
            "evt_listen_a heard hello",
            "evt_listen_b heard hello",
        ]
        assert await bot.receive("quiet") == []
        # An unknown command is an ordinary message.
        assert await bot.receive("/nosuch x") == [
            "evt_listen_a heard /nosuch x",
            "evt_listen_b heard /nosuch x",
        ]
        # A command is not offered to the listeners; intermediate messages come first.
        assert await bot.receive("/steps") == ["step 1", "step 2", "finished"]
        assert all(t.chat_id == "chat-1" for t, _ in bot.sent)


# -- isolation -------------------------------------------------------------------------

_BAD = """
from kernel import CommandSpec, hookimpl


async def boom(cmd):
    raise RuntimeError("boom handler")


async def wrong(cmd):
    return 42


@hookimpl
def nekobot_commands():
    return [CommandSpec("boom", boom), CommandSpec("wrong", wrong)]


@hookimpl
async def nekobot_on_message(event, ctx):
    raise RuntimeError("boom on_message")


@hookimpl
async def nekobot_on_event(event, ctx):
    raise RuntimeError("boom on_event")


@hookimpl
async def nekobot_plugin_stop(ctx):
    raise RuntimeError("boom stop")
"""

_GOOD = """
from kernel import CommandSpec, hookimpl

events = []
got_event = None  # set by the test: an anyio.Event


async def good(cmd):
    return "good ok"


@hookimpl
def nekobot_commands():
    return [CommandSpec("good", good)]


@hookimpl
async def nekobot_on_message(event, ctx):
    return "good heard " + event.text


@hookimpl
async def nekobot_on_event(event, ctx):
    events.append(event.type)
    if got_event is not None and event.type == "test.ping":
        got_event.set()
"""

_BAD_START = """
from kernel import CommandSpec, hookimpl


async def never(cmd):
    return "never"


@hookimpl
def nekobot_commands():
    return [CommandSpec("never", never)]


@hookimpl
async def nekobot_plugin_start(ctx):
    raise RuntimeError("boom start")
"""


@pytest.mark.anyio
async def test_a_plugin_raising_in_every_hook_does_not_stop_others(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "evt_bad", _BAD)
    write_plugin(plugins, "evt_good", _GOOD)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        [failed] = await bot.receive("/boom")
        assert "failed" in failed
        assert await bot.receive("/wrong") == []
        assert await bot.receive("/good") == ["good ok"]
        assert await bot.receive("hello") == ["good heard hello"]

        good = module_of(kernel, "evt_good")
        good.got_event = anyio.Event()
        records = record_logs(kernel)
        await kernel.emit(KernelEvent("test.ping", {"n": 1}))
        with anyio.fail_after(PATIENCE):
            await good.got_event.wait()
        # The failing plugin's event hook ran too (and its error was logged, below).
        await records.wait_for(
            lambda r: r.plugin == "evt_bad" and r.level == "ERROR" and "boom on_event" in r.message
        )

        await kernel.plugins.disable("evt_bad")  # its stop hook raises
        assert kernel.plugins.info("evt_bad").state is PluginState.DISPOSED
        assert kernel.commands.lookup("boom") is None
        assert await bot.receive("/good") == ["good ok"]
        assert await bot.receive("hi") == ["good heard hi"]

        errors = plugin_errors(kernel, "evt_bad")
        for needle in ("boom handler", "not int", "boom on_message", "boom on_event", "boom stop"):
            assert any(needle in m for m in errors), (needle, errors)
        assert plugin_errors(kernel, "evt_good") == []


@pytest.mark.anyio
async def test_a_failing_start_hook_makes_the_plugin_failed(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "evt_badstart", _BAD_START)
    write_plugin(plugins, "evt_good", _GOOD)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        info = kernel.plugins.info("evt_badstart")
        assert info.state is PluginState.FAILED
        assert info.error is not None and "boom start" in info.error
        assert kernel.commands.lookup("never") is None
        bot = MockBot(kernel)
        assert await bot.receive("/never") == ["good heard /never"]
        assert await bot.receive("/good") == ["good ok"]
        with pytest.raises(PluginLoadError, match="nekobot_plugin_start"):
            await kernel.plugins.enable("evt_badstart")
        assert kernel.plugins.info("evt_badstart").state is PluginState.FAILED
        assert any("boom start" in m for m in plugin_errors(kernel, "evt_badstart"))


_HANG = """
import anyio

from kernel import CommandSpec, hookimpl

started = None  # set by the test: an anyio.Event


async def hang(cmd):
    started.set()
    await anyio.sleep_forever()


async def quick(cmd):
    return "quick " + cmd.event.chat_id


@hookimpl
def nekobot_commands():
    return [CommandSpec("hang", hang), CommandSpec("quick", quick)]


@hookimpl
async def nekobot_on_message(event, ctx):
    if event.text == "hang":
        await anyio.sleep_forever()
    return None
"""


@pytest.mark.anyio
async def test_a_hanging_handler_is_bounded_by_handler_timeout(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "evt_hang", _HANG)
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[tmp_path / "plugins"], handler_timeout=0.3
    ) as kernel:
        bot = MockBot(kernel)
        mod = module_of(kernel, "evt_hang")
        mod.started = anyio.Event()
        # The outer bound only turns a missing handler timeout into a failure, not a hang.
        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(bot.receive, "/hang", chat_id="A"))
                await mod.started.wait()
                assert await bot.receive("/quick", chat_id="B") == ["quick B"]
        # In either order: which comes first is a race between the 0.3 s timeout and
        # the machine's speed (that B is not held up by A is proven deterministically
        # by test_a_slow_conversation_does_not_delay_another).
        assert sorted((t.chat_id, r.plain_text) for t, r in bot.sent) == [
            ("A", "/hang timed out."),
            ("B", "quick B"),
        ]
        # The conversation is free again afterwards.
        assert await bot.receive("/quick", chat_id="A") == ["quick A"]
        # A hanging message hook is bounded too.
        with anyio.fail_after(PATIENCE):
            assert await bot.receive("hang", chat_id="A") == []
        errors = plugin_errors(kernel, "evt_hang")
        assert any("timed out" in m and "hang" in m for m in errors), errors
        assert any("nekobot_on_message of plugin 'evt_hang' timed out" in m for m in errors), errors


WAKE = """
from kernel import hookimpl, CommandSpec

async def ping(cmd):
    return "pong " + cmd.args

@hookimpl
def nekobot_commands():
    return [CommandSpec("ping", ping)]

@hookimpl
async def nekobot_on_message(event, ctx):
    return f"chat to_me={event.to_me} text={event.text!r}"
"""


@pytest.mark.anyio
async def test_wake_words_address_the_bot(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "ev_wake", WAKE)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        await kernel.update_bot_config(wake_words=["Neko"])
        bot = MockBot(kernel, chat_type="group")
        assert await bot.receive("neko, ping a") == ["pong a"]
        assert await bot.receive("NEKO /ping b") == ["pong b"]
        assert await bot.receive("/ping c") == ["pong c"]
        assert await bot.receive("neko how are you") == ["chat to_me=True text='how are you'"]
        assert await bot.receive("nekomimi ping") == ["chat to_me=False text='nekomimi ping'"]
        assert await bot.receive("ping d") == ["chat to_me=False text='ping d'"]


_EVENT_LISTENER = """
from kernel import hookimpl

@hookimpl
async def nekobot_on_event(event, ctx):
    ctx.services.get("evt_heard")((ctx.name, event.type))

@hookimpl
async def nekobot_plugin_stop(ctx):
    if ctx.name == "evt_hear_a":
        await ctx.emit("evt.stopping")
"""


@pytest.mark.anyio
async def test_on_event_is_not_delivered_into_a_retiring_generation(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "evt_hear_a", _EVENT_LISTENER)
    write_plugin(plugins, "evt_hear_b", _EVENT_LISTENER)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        heard: Collected[tuple[str, str]] = Collected()
        kernel.services.provide("tests", "evt_heard", heard)
        # a's stop hook emits while a's gate is already closed.
        await kernel.plugins.disable("evt_hear_a")
        await heard.wait_for(lambda item: item == ("evt_hear_b", "evt.stopping"))
        assert ("evt_hear_a", "evt.stopping") not in heard.items
        await kernel.emit(KernelEvent("evt.after"))
        await heard.wait_for(lambda item: item == ("evt_hear_b", "evt.after"))
        assert ("evt_hear_a", "evt.after") not in heard.items
