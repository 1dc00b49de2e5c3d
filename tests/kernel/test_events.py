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
async def test_a_command_is_not_offered_to_on_message(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "evt_listen_a", _LISTENER.replace("{name}", "evt_listen_a"))
    write_plugin(plugins, "evt_steps", _STEPS)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("hello") == ["evt_listen_a heard hello"]
        assert await bot.receive("quiet") == []
        # An unknown command is an ordinary message.
        assert await bot.receive("/nosuch x") == ["evt_listen_a heard /nosuch x"]
        # A command is not offered to the listeners; intermediate messages come first.
        assert await bot.receive("/steps") == ["step 1", "step 2", "finished"]
        assert all(t.chat_id == "chat-1" for t, _ in bot.sent)


# -- one reply per message ------------------------------------------------------------

#: A chatty plugin; `mode` (a module global the tests change) says how it behaves.
_CHAT = """
import anyio

from kernel import CommandSpec, Priority, hookimpl, priority

mode = "answer"
#: (text, handled, handled_by) for each message offered, as the handler saw it.
offered = []
journal = None  # set by a test: a list shared by several plugins
kept = None


async def nothing(cmd):
    return None


@hookimpl
def nekobot_commands():
    return [
        CommandSpec("{name}-quiet", nothing),
        CommandSpec("{name}-admin", nothing, permission="admin"),
    ]


@hookimpl
@priority({priority})
async def nekobot_on_message(event, ctx, dispatch):
    global kept
    offered.append((event.text, dispatch.handled, dispatch.handled_by))
    if journal is not None:
        journal.append(("enter", ctx.name))
        await anyio.sleep(0)
        journal.append(("leave", ctx.name))
    if mode == "decline":
        return None
    if mode == "pass":
        dispatch.pass_on()
        return ctx.name + " passes on " + event.text
    if mode == "swallow":
        dispatch.mark_handled()
        return None
    if mode == "send":
        await dispatch.send(ctx.name + " sends first")
        return None
    if mode == "keep":
        kept = dispatch
        return None
    if mode == "raise":
        raise RuntimeError("chat boom")
    if mode == "send-raise":
        await dispatch.send(ctx.name + " sent")
        raise RuntimeError("chat boom after sending")
    if mode == "hang":
        await anyio.sleep_forever()
    if mode == "wrong":
        return 42
    return ctx.name + " answers " + event.text


on_stop = None  # set by a test: a coroutine function to await while stopping


@hookimpl
async def nekobot_plugin_stop(ctx):
    if on_stop is not None:
        await on_stop()
"""


def write_chat(plugins: Path, name: str, level: str = "Priority.NORMAL") -> None:
    """A chatty plugin `name` at priority `level` (Python source: `Priority.HIGH`, `5`)."""
    write_plugin(plugins, name, _CHAT.replace("{name}", name).replace("{priority}", level))


@pytest.mark.anyio
async def test_only_the_highest_priority_answer_is_sent(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_a")  # first by name, NORMAL
    write_chat(plugins, "evt_chat_z", "Priority.HIGH")
    write_chat(plugins, "evt_chat_m", "-5")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("hello") == ["evt_chat_z answers hello"]
        assert module_of(kernel, "evt_chat_z").offered == [("hello", False, ())]
        assert module_of(kernel, "evt_chat_a").offered == []
        assert module_of(kernel, "evt_chat_m").offered == []
        # The first declines: the next in priority order answers, then nobody else.
        module_of(kernel, "evt_chat_z").mode = "decline"
        assert await bot.receive("again") == ["evt_chat_a answers again"]
        assert module_of(kernel, "evt_chat_m").offered == []
        module_of(kernel, "evt_chat_a").mode = "decline"
        assert await bot.receive("third") == ["evt_chat_m answers third"]
        module_of(kernel, "evt_chat_m").mode = "decline"
        assert await bot.receive("fourth") == []
        assert [text for text, _, _ in module_of(kernel, "evt_chat_m").offered] == [
            "third",
            "fourth",
        ]


@pytest.mark.anyio
async def test_equal_priorities_go_in_plugin_name_order_one_at_a_time(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    for name in ("evt_chat_b", "evt_chat_c", "evt_chat_a"):  # not in name order
        write_chat(plugins, name)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("hello") == ["evt_chat_a answers hello"]
        # A reload re-registers evt_chat_a last with pluggy; the order stays by name.
        await kernel.plugins.reload("evt_chat_a")
        assert await bot.receive("hello") == ["evt_chat_a answers hello"]
        # All pass on: each is offered the message in turn, never two at once.
        journal: list[tuple[str, str]] = []
        for name in ("evt_chat_a", "evt_chat_b", "evt_chat_c"):
            module_of(kernel, name).mode = "pass"
            module_of(kernel, name).journal = journal
        assert await bot.receive("hi") == [
            "evt_chat_a passes on hi",
            "evt_chat_b passes on hi",
            "evt_chat_c passes on hi",
        ]
        assert journal == [
            (step, name)
            for name in ("evt_chat_a", "evt_chat_b", "evt_chat_c")
            for step in ("enter", "leave")
        ]
        # Later handlers see that the message is handled, and by whom.
        assert module_of(kernel, "evt_chat_c").offered[-1] == (
            "hi",
            True,
            ("evt_chat_a", "evt_chat_b"),
        )


@pytest.mark.anyio
async def test_passing_on_and_marking_handled(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_hi", "Priority.HIGH")
    write_chat(plugins, "evt_chat_lo", "Priority.LOW")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        high, low = module_of(kernel, "evt_chat_hi"), module_of(kernel, "evt_chat_lo")
        # Answer and pass on: both replies are sent, in priority order.
        high.mode = "pass"
        assert await bot.receive("one") == [
            "evt_chat_hi passes on one",
            "evt_chat_lo answers one",
        ]
        assert low.offered == [("one", True, ("evt_chat_hi",))]
        # Marked handled without a reply: nothing is sent, nobody else is offered it.
        high.mode = "swallow"
        assert await bot.receive("two") == []
        assert [text for text, _, _ in low.offered] == ["one"]
        # Sending through the dispatch answers the message too.
        high.mode = "send"
        assert await bot.receive("three") == ["evt_chat_hi sends first"]
        assert [text for text, _, _ in low.offered] == ["one"]
        # A value that is not a reply is an error of that plugin, and not an answer.
        high.mode = "wrong"
        assert await bot.receive("four") == ["evt_chat_lo answers four"]
        assert any("not int" in m for m in plugin_errors(kernel, "evt_chat_hi"))
        # The dispatch is only valid during the handler's turn.
        high.mode = "keep"
        assert await bot.receive("five") == ["evt_chat_lo answers five"]
        with pytest.raises(RuntimeError, match="turn has ended"):
            await high.kept.send("too late")
        with pytest.raises(RuntimeError, match="turn has ended"):
            high.kept.pass_on()
        assert bot.replies[-1] == "evt_chat_lo answers five"


@pytest.mark.anyio
async def test_a_failing_handler_passes_the_message_to_the_next(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_hi", "Priority.HIGH")
    write_chat(plugins, "evt_chat_lo")
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugins], handler_timeout=0.3
    ) as kernel:
        bot = MockBot(kernel)
        high = module_of(kernel, "evt_chat_hi")
        high.mode = "raise"
        assert await bot.receive("one") == ["evt_chat_lo answers one"]
        high.mode = "hang"
        with anyio.fail_after(10):
            assert await bot.receive("two") == ["evt_chat_lo answers two"]
        errors = plugin_errors(kernel, "evt_chat_hi")
        assert any("chat boom" in m for m in errors), errors
        assert any("nekobot_on_message of plugin 'evt_chat_hi' timed out" in m for m in errors)
        assert plugin_errors(kernel, "evt_chat_lo") == []
        # What a handler sent before it failed is its answer: nobody answers twice.
        high.mode = "send-raise"
        assert await bot.receive("three") == ["evt_chat_hi sent"]


@pytest.mark.anyio
async def test_a_fallback_answers_only_what_nobody_else_did(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_llm", "Priority.FALLBACK")  # an LLM chat plugin's place
    write_chat(plugins, "evt_chat_zz", "Priority.LOW")
    write_plugin(plugins, "evt_steps", _STEPS)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        llm, chat = module_of(kernel, "evt_chat_llm"), module_of(kernel, "evt_chat_zz")
        assert await bot.receive("hello") == ["evt_chat_zz answers hello"]
        chat.mode = "decline"
        assert await bot.receive("hello") == ["evt_chat_llm answers hello"]
        # Never after a command, whatever the command answers, even nothing or a refusal.
        assert await bot.receive("/steps") == ["step 1", "step 2", "finished"]
        assert await bot.receive("/evt_chat_zz-quiet") == []
        [refusal] = await bot.receive("/evt_chat_zz-admin")
        assert "not allowed" in refusal
        assert [text for text, _, _ in llm.offered] == ["hello"]
        # A message naming no command is an ordinary message.
        assert await bot.receive("/nosuch") == ["evt_chat_llm answers /nosuch"]
        # After a pass-on the fallback is offered the message and sees it handled.
        chat.mode = "pass"
        llm.mode = "decline"
        assert await bot.receive("hi") == ["evt_chat_zz passes on hi"]
        assert llm.offered[-1] == ("hi", True, ("evt_chat_zz",))


@pytest.mark.anyio
async def test_the_order_survives_a_reload_of_the_higher_priority_plugin(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_llm", "Priority.FALLBACK")
    write_chat(plugins, "evt_chat_zz", "Priority.HIGH")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        for _ in range(2):
            await kernel.plugins.reload("evt_chat_zz")
            assert await bot.receive("hello") == ["evt_chat_zz answers hello"]
            assert module_of(kernel, "evt_chat_llm").offered == []
        # A reload may change the priority: the new generation's counts.
        write_chat(plugins, "evt_chat_zz", "Priority.FALLBACK - 1")
        await kernel.plugins.reload("evt_chat_zz")
        assert await bot.receive("hello") == ["evt_chat_llm answers hello"]
        await kernel.plugins.disable("evt_chat_llm")
        assert await bot.receive("hello") == ["evt_chat_zz answers hello"]


@pytest.mark.anyio
async def test_a_message_arriving_during_a_reload_waits_for_the_new_generation(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_hi", "Priority.HIGH")
    write_chat(plugins, "evt_chat_lo")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        stopping, release = anyio.Event(), anyio.Event()

        async def hold_the_swap() -> None:
            stopping.set()
            await release.wait()

        module_of(kernel, "evt_chat_hi").on_stop = hold_the_swap
        got: list[list[str]] = []

        async def receive() -> None:
            got.append(await bot.receive("hello", chat_id="B"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(kernel.plugins.reload, "evt_chat_hi")
            await stopping.wait()  # the old generation's gate is closed now
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            # Not answered by the next handler in line: it waits for the swap.
            assert got == [] and module_of(kernel, "evt_chat_lo").offered == []
            release.set()
        assert got == [["evt_chat_hi answers hello"]]
        assert module_of(kernel, "evt_chat_lo").offered == []


@pytest.mark.anyio
async def test_a_message_sent_by_a_plugins_own_operation_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    write_chat(plugins, "evt_chat_hi", "Priority.HIGH")
    write_chat(plugins, "evt_chat_lo")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        during: list[list[str]] = []

        async def receive_while_stopping() -> None:
            during.append(await bot.receive("hello", chat_id="B"))

        # Dispatched from the plugin's own stop hook: waiting for the reload would be
        # waiting for itself, so the going generation is skipped and the next answers.
        module_of(kernel, "evt_chat_hi").on_stop = receive_while_stopping
        await kernel.plugins.reload("evt_chat_hi")
        assert during == [["evt_chat_lo answers hello"]]
        assert await bot.receive("hello") == ["evt_chat_hi answers hello"]


_BAD_PRIORITY = """
from kernel import hookimpl, priority

@hookimpl
@priority({level})
async def {hook}(event, ctx):
    return None
"""


@pytest.mark.anyio
async def test_a_bad_priority_is_a_load_error(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    for name, level, hook in (
        ("evt_prio_str", '"high"', "nekobot_on_message"),
        ("evt_prio_bool", "True", "nekobot_on_message"),
        ("evt_prio_event", "5", "nekobot_on_event"),
    ):
        write_plugin(plugins, name, _BAD_PRIORITY.format(level=level, hook=hook))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        for name, needle in (
            ("evt_prio_str", "priority must be an int (or a Priority), not str"),
            ("evt_prio_bool", "not bool"),
            ("evt_prio_event", "@priority on nekobot_on_event: only nekobot_on_message"),
        ):
            info = kernel.plugins.info(name)
            assert info.state is PluginState.FAILED, name
            assert info.error is not None and needle in info.error, (name, info.error)


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
from kernel.testing import Collected

@hookimpl
async def nekobot_on_event(event, ctx):
    ctx.services.current(Collected)((ctx.name, event.type))

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
        kernel.services.provide("tests", Collected, heard)
        # a's stop hook emits while a's gate is already closed.
        await kernel.plugins.disable("evt_hear_a")
        await heard.wait_for(lambda item: item == ("evt_hear_b", "evt.stopping"))
        assert ("evt_hear_a", "evt.stopping") not in heard.items
        await kernel.emit(KernelEvent("evt.after"))
        await heard.wait_for(lambda item: item == ("evt_hear_b", "evt.after"))
        assert ("evt_hear_a", "evt.after") not in heard.items
