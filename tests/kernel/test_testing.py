"""Tests of kernel.testing and the `nekobot` pytest plugin: MockBot and the fixtures."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from kernel import Image, KernelEvent, Reply, Sender, Target, Text, testing
from kernel.kernel import Kernel
from kernel.testing import (
    Collected,
    MockBot,
    record_events,
    record_logs,
    running_kernel,
    wait_until,
)
from tests.plugin_factory import write_plugin

_ECHO = """
from kernel import CommandSpec, Image, Reply, Text, hookimpl


async def echo(cmd):
    return cmd.args


async def whoami(cmd):
    e = cmd.event
    return f"{e.platform}/{e.instance}/{e.chat_type}/{e.chat_id}/{e.sender.id}/{e.id}"


async def picture(cmd):
    return Reply((Text("look: "), Image("https://example.invalid/cat.png")))


@hookimpl
def nekobot_commands():
    return [
        CommandSpec("echo", echo),
        CommandSpec("whoami", whoami),
        CommandSpec("picture", picture),
    ]
"""

# The marker's arguments are fixed at collection time, so the plugin directory of the
# fixture tests has a fixed path, filled by a module-scoped fixture.
_MARKED_PLUGINS = Path(tempfile.gettempdir()) / f"nekobot-test-testing-{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def _marked_plugins() -> Iterator[Path]:
    write_plugin(_MARKED_PLUGINS, "tst_echo", _ECHO)
    yield _MARKED_PLUGINS
    shutil.rmtree(_MARKED_PLUGINS, ignore_errors=True)


# -- the pytest fixtures ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.nekobot(plugin_dirs=[_MARKED_PLUGINS])
async def test_bot_fixture_echo(bot: MockBot) -> None:
    assert await bot.receive("/echo hi") == ["hi"]
    assert bot.replies == ["hi"]
    assert await bot.receive("/echo again") == ["again"]
    assert bot.replies == ["hi", "again"]
    bot.clear()
    assert bot.replies == []


@pytest.mark.anyio
@pytest.mark.nekobot(builtin_plugins=["help"], plugin_dirs=[_MARKED_PLUGINS])
async def test_marker_chooses_builtins(bot: MockBot, nekobot_kernel: Kernel) -> None:
    assert bot.kernel is nekobot_kernel
    assert sorted(nekobot_kernel.plugins.records) == ["help", "tst_echo"]
    [listing] = await bot.receive("/help")
    assert "/echo" in listing and "/help" in listing


@pytest.mark.anyio
@pytest.mark.nekobot(plugin_dirs=[_MARKED_PLUGINS], command_prefixes=("!",))
async def test_marker_passes_kernel_options(bot: MockBot) -> None:
    assert await bot.receive("/echo hi") == []
    assert await bot.receive("!echo hi") == ["hi"]


@pytest.mark.anyio
async def test_default_fixture_kernel_is_quiet_and_empty(
    nekobot_kernel: Kernel, tmp_path: Path
) -> None:
    config = nekobot_kernel.config
    assert nekobot_kernel.running
    assert config.entry_points is False
    assert config.hot_reload is False and nekobot_kernel.settings.hot_reload is False
    assert config.watchdog is False
    assert config.builtin_plugins == ()
    assert nekobot_kernel.plugins.records == {}
    assert config.data_dir.is_relative_to(tmp_path)
    assert await MockBot(nekobot_kernel).receive("/echo hi") == []


# -- MockBot ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_mock_bot_events_and_targets(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "tst_echo", _ECHO)
    async with running_kernel(tmp_path / "data", plugin_dirs=[tmp_path / "plugins"]) as kernel:
        bot = MockBot(kernel)
        event = bot.event("hello")
        assert (event.platform, event.instance, event.chat_type, event.chat_id) == (
            "mock",
            "mock",
            "private",
            "chat-1",
        )
        assert event.text == "hello" and event.sender == Sender("user-1", "Tester")
        assert await bot.receive("/whoami") == ["mock/mock/private/chat-1/user-1/2"]
        assert await bot.receive(
            "/whoami", chat_type="group", chat_id="g-9", sender=Sender("u-7")
        ) == ["mock/mock/group/g-9/u-7/3"]
        assert [t for t, _ in bot.sent] == [
            Target("mock", "private", "chat-1"),
            Target("mock", "group", "g-9"),
        ]
        # Segments other than text are kept; `replies` shows the text.
        assert await bot.receive("/picture") == ["look: "]
        _, reply = bot.sent[-1]
        assert reply.segments[1] == Image("https://example.invalid/cat.png")
        # A message made of segments.
        assert await bot.receive("", segments=[Text("/echo a"), Text("b")]) == ["ab"]

        group = MockBot(kernel, instance="mock-2", chat_type="group", chat_id="room")
        assert await group.receive("/whoami") == ["mock/mock-2/group/room/user-1/1"]
        assert len(bot.sent) == 4  # the other bot's replies went to the other bot

        # The kernel can send through a bot by its instance, as plugins do.
        await kernel.pipeline.send(Target("mock-2", "group", "room"), Reply.text("push"))
        assert group.replies[-1] == "push"
        with pytest.raises(LookupError):
            await kernel.pipeline.send(Target("nobody", "group", "room"), Reply.text("x"))


@pytest.mark.anyio
async def test_one_instance_has_one_mock_bot(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as kernel:
        bot = MockBot(kernel)
        with pytest.raises(ValueError, match="already has an adapter"):
            MockBot(kernel)
        bot.detach()
        again = MockBot(kernel)
        assert kernel.pipeline.adapters["mock"] is again


@pytest.mark.anyio
async def test_running_kernel_options_can_be_overridden(tmp_path: Path) -> None:
    async with running_kernel(
        tmp_path / "data", builtin_plugins=["help"], watchdog=True, handler_timeout=3
    ) as kernel:
        # Not just stored: the watchdog runs.
        assert any(t.get_name() == "nekobot-watchdog" for t in asyncio.all_tasks())
        assert kernel.config.handler_timeout == 3
        assert kernel.config.hot_reload is False
        assert list(kernel.plugins.records) == ["help"]
    assert not kernel.running


# -- waiting for what other tasks and threads do ----------------------------------------


@pytest.mark.anyio
async def test_collected_waits_for_an_item_from_another_thread() -> None:
    items: Collected[int] = Collected([1])
    assert await items.wait_for(lambda n: n == 1) == 1  # collected already
    async with anyio.create_task_group() as tg:
        # Handed over from a worker thread (before or while the wait below runs).
        tg.start_soon(anyio.to_thread.run_sync, lambda: [items(n) for n in (2, 3)])
        assert await items.wait_for(lambda n: n > 2) == 3
    items(4)  # and from the loop's thread
    assert await items.wait_for(lambda n: n == 4) == 4


@pytest.mark.anyio
async def test_collected_gives_up_after_its_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testing, "PATIENCE", 0.05)
    items: Collected[int] = Collected([1, 2])
    with pytest.raises(TimeoutError):
        await items.wait_for(lambda n: n > 2)


@pytest.mark.anyio
async def test_record_logs_and_events(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as kernel:
        kernel.log.warning("zztesting before")
        records = record_logs(kernel)
        events = record_events(kernel)
        await anyio.to_thread.run_sync(kernel.log.warning, "zztesting from a thread")
        kernel.log.warning("zztesting after")
        await kernel.emit(KernelEvent("zztesting.ping", {"n": 1}))
        for text in ("before", "from a thread", "after"):
            found = await records.wait_for(lambda r, t=text: r.message == f"zztesting {t}")
            assert found.level == "WARNING"
        assert (await events.wait_for(lambda e: e.type == "zztesting.ping")).data == {"n": 1}


@pytest.mark.anyio
async def test_wait_until_polls_a_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    async def at_once() -> bool:
        return True

    await wait_until(third_time, interval=0)
    assert len(calls) == 3
    await wait_until(at_once)
    monkeypatch.setattr(testing, "PATIENCE", 0.05)
    with pytest.raises(TimeoutError):
        await wait_until(lambda: False)


@pytest.mark.anyio
async def test_test_kernels_also_serve_the_test_clients_host(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as kernel:
        transport = httpx.ASGITransport(app=kernel.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            assert (await c.get("/nowhere")).status_code == 404  # served: no such route
            r = await c.get("/nowhere", headers={"Host": "elsewhere.example"})
            assert r.status_code == 421
