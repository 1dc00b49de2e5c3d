"""Tests of kernel.adapter: capabilities and fitting, stats, and platform instances opened
through the kernel (the docs' loopback adapter, driven through the pipeline)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernel import PlatformType as ExportedPlatformType
from kernel.adapter import (
    Adapter,
    AdapterStats,
    Capabilities,
    PlatformInstance,
    PlatformType,
    SendResult,
    StatsRecorder,
    SupportsCallApi,
    open_platform,
)
from kernel.kernel import Kernel
from kernel.messages import Image, Mention, Quote, Raw, Reply, Target, Text
from kernel.models import PlatformType as ModelsPlatformType
from kernel.testing import MockBot, running_kernel
from tests.plugin_factory import purge_modules, write_plugin

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "plugins" / "loopback_chat"

COMMANDS = """
from kernel import CommandSpec, hookimpl
from kernel.messages import Image, Mention, Reply, Text


async def echo(cmd):
    return cmd.args


async def picture(cmd):
    return Reply((Text("look "), Mention(cmd.event.sender.id, "you"), Text(": "),
                  Image("https://example.invalid/cat.png", name="cat.png")))


@hookimpl
def nekobot_commands():
    return [CommandSpec("echo", echo), CommandSpec("picture", picture)]
"""

NOT_AN_ADAPTER = """
from kernel import PlatformType, hookimpl


class HalfAdapter:
    async def send(self, target, reply):
        return None


@hookimpl
def nekobot_platform_types():
    return [PlatformType("ta_half", lambda ctx, instance: HalfAdapter())]
"""


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    plugins = tmp_path / "plugins"
    shutil.copytree(EXAMPLE, plugins / "loopback_chat")
    write_plugin(plugins, "ta_commands", COMMANDS)
    write_plugin(plugins, "ta_half", NOT_AN_ADAPTER)
    for name in ("loopback_chat", "ta_commands", "ta_half"):
        purge_modules(name)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as k:
        yield k


def test_platform_type_is_exported_where_it_always_was() -> None:
    assert ExportedPlatformType is PlatformType is ModelsPlatformType


# ------------------------------------------------------------------ capabilities


def test_capabilities_always_include_text_and_know_the_segment_types() -> None:
    assert Capabilities().segments == {"text"}
    assert Capabilities({"image"}).segments == {"text", "image"}
    with pytest.raises(ValueError, match="unknown segment types in capabilities: gif"):
        Capabilities({"image", "gif"})
    with pytest.raises(ValueError, match="'max_text_length' must be >= 1: 0"):
        Capabilities(max_text_length=0)


def test_a_reply_that_fits_passes_untouched() -> None:
    reply = Reply((Text("hi "), Mention("42")))
    assert Capabilities({"mention"}).fit(reply)[0] is reply
    assert Capabilities(max_text_length=3).fit(Reply.text("abc"))[0] == Reply.text("abc")
    assert Capabilities().fit(Reply(())) == ()


def test_fit_degrades_what_the_adapter_cannot_send() -> None:
    reply = Reply((Quote("m-1"), Text("see "), Image("https://example.invalid/c.png", name="c")))
    assert Capabilities().fit(reply) == (Reply((Text("see [image: c]"),)),)
    assert Capabilities({"quote"}).fit(reply) == (Reply((Quote("m-1"), Text("see [image: c]"))),)
    face = Raw("face", {"id": "1"}, fallback=":)")
    assert Capabilities({"raw"}, raw_kinds={"face"}).fit(Reply((face,))) == (Reply((face,)),)
    assert Capabilities({"raw"}).fit(Reply((face,))) == (Reply.text(":)"),)
    assert Capabilities.everything().fit(Reply((face,))) == (Reply((face,)),)


def test_a_long_text_is_split_at_a_space_or_newline() -> None:
    caps = Capabilities({"image"}, max_text_length=10)
    parts = caps.fit(Reply((Text("one two three\nfour five"), Image("u"), Text("six"))))
    assert [p.segments for p in parts] == [
        (Text("one two"),),
        (Text("three"),),
        (Text("four five"), Image("u"), Text("s")),
        (Text("ix"),),
    ]
    assert all(len(p.plain_text) <= 10 for p in parts)
    # No break in sight: cut at the limit.
    parts = Capabilities(max_text_length=4).fit(Reply.text("abcdefghij"))
    assert [p.plain_text for p in parts] == ["abcd", "efgh", "ij"]


# ------------------------------------------------------------------ stats


def test_stats_recorder_counts_and_marks_the_start() -> None:
    stats = StatsRecorder()
    assert stats.snapshot() == AdapterStats()
    stats.set_status("starting")
    stats.set_status("running")
    started = stats.started_at
    assert started is not None
    stats.set_status("reconnecting")
    stats.reconnected()
    stats.set_status("running")  # back from a reconnect: still the same start
    assert stats.started_at == started
    stats.error(ConnectionError("reset by peer"))
    stats.error(TimeoutError())
    snap = stats.snapshot()
    assert (snap.status, snap.reconnects, snap.errors) == ("running", 1, 2)
    assert snap.last_error == "TimeoutError"
    stats.error("heartbeat stopped\n  after 30 s")
    assert stats.snapshot().last_error == "heartbeat stopped after 30 s"


# ------------------------------------------------------------------ the pipeline


@pytest.mark.anyio
async def test_the_pipeline_refuses_what_is_not_an_adapter(kernel: Kernel) -> None:
    class SendOnly:
        async def send(self, target: Target, reply: Reply) -> SendResult:
            return SendResult()

    with pytest.raises(TypeError, match="SendOnly is not an Adapter"):
        kernel.pipeline.attach("x", SendOnly())  # type: ignore[arg-type]
    assert "x" not in kernel.pipeline.adapters
    with pytest.raises(TypeError, match="factory returned HalfAdapter"):
        open_platform(kernel, PlatformInstance("half-1", "ta_half"))
    assert "half-1" not in kernel.pipeline.adapters


@pytest.mark.anyio
async def test_replies_are_fitted_to_a_mock_bots_capabilities(kernel: Kernel) -> None:
    everything = MockBot(kernel)
    assert await everything.receive("/picture") == ["look : "]
    assert everything.sent[-1][1].segments[-1] == Image(
        "https://example.invalid/cat.png", name="cat.png"
    )
    text_only = MockBot(kernel, instance="mock-text", capabilities=Capabilities())
    assert await text_only.receive("/picture") == ["look @you: [image: cat.png]"]
    assert text_only.sent[-1][1].segments == (Text("look @you: [image: cat.png]"),)


def test_an_instance_repr_leaves_its_config_out() -> None:
    instance = PlatformInstance("qq-1", "onebot_v11", {"access_token": "s3cret"})
    assert "s3cret" not in repr(instance) and instance.config["access_token"] == "s3cret"


@pytest.mark.anyio
async def test_open_platform_refuses_an_unknown_type(kernel: Kernel) -> None:
    with pytest.raises(LookupError, match="no platform type 'telepathy'"):
        open_platform(kernel, PlatformInstance("t-1", "telepathy"))


@pytest.mark.anyio
async def test_the_loopback_example_round_trips_through_the_pipeline(kernel: Kernel) -> None:
    handle = open_platform(kernel, PlatformInstance("loop-1", "loopback", {"max_text_length": 20}))
    adapter: Any = handle.adapter
    assert isinstance(adapter, Adapter) and not isinstance(adapter, SupportsCallApi)
    assert kernel.pipeline.adapters["loop-1"] is adapter
    with pytest.raises(ValueError, match="'loop-1' already has an adapter"):
        open_platform(kernel, PlatformInstance("loop-1", "loopback"))
    with pytest.raises(RuntimeError, match="not running"):
        await adapter.receive("room", "/echo hi")
    await adapter.start()
    assert handle.stats.status == "running" and handle.stats.started_at is not None

    # In: a message; out: the command's reply, through the adapter's send.
    assert await adapter.receive("room", "/echo hi") == 1
    assert adapter.outbox == [("room", Reply.text("hi"))]
    # A reply with an image, to a platform of text and mentions, longer than 20 characters.
    assert await adapter.receive("room", "/picture", user="u-7") == 1
    assert [(chat, r.segments) for chat, r in adapter.outbox[1:]] == [
        ("room", (Text("look "), Mention("u-7", "you"), Text(": [image:"))),
        ("room", (Text("cat.png]"),)),
    ]
    # ctx.send-style sends count too, and report the platform's message ids.
    sent = await kernel.pipeline.send(
        Target("loop-1", "group", "hall"), Reply.text("a reply that is too long")
    )
    assert sent == SendResult(("4", "5"))
    assert await handle.context.plugin.send(Target("loop-1", "group", "hall"), "hey") == (
        SendResult(("6",))
    )
    stats = handle.stats
    assert (stats.received, stats.sent, stats.errors, stats.last_error) == (2, 6, 0, None)

    # A send that fails is counted, and raised to whoever sent.
    async def broken(target: Target, reply: Reply) -> SendResult:
        raise ConnectionError("socket closed")

    adapter.send = broken
    with pytest.raises(ConnectionError):
        await kernel.pipeline.send(Target("loop-1", "group", "hall"), Reply.text("x"))
    assert (handle.stats.errors, handle.stats.last_error) == (1, "ConnectionError: socket closed")

    # An adapter delivers only its own instance's events.
    other = adapter.ctx
    with pytest.raises(ValueError, match="instance 'loop-2' delivered by 'loop-1'"):
        from kernel.messages import MessageEvent, Sender

        await other.deliver(
            MessageEvent("loopback", "loop-2", "group", "room", Sender("u"), (Text("/echo"),))
        )

    await handle.close()
    await handle.close()  # idempotent
    assert handle.closed and handle.stats.status == "stopped"
    assert "loop-1" not in kernel.pipeline.adapters
    # A message read after the close has nowhere to go.
    adapter.ctx.stats.set_status("running")
    with pytest.raises(RuntimeError, match="platform instance 'loop-1' is closed"):
        await adapter.receive("room", "/echo late")


@pytest.mark.anyio
async def test_an_open_instance_is_closed_with_its_adapter_plugin(kernel: Kernel) -> None:
    handle = open_platform(kernel, PlatformInstance("loop-2", "loopback"))
    await handle.adapter.start()
    await kernel.plugins.disable("loopback_chat")
    assert handle.closed and handle.stats.status == "stopped"
    assert "loop-2" not in kernel.pipeline.adapters
    with pytest.raises(LookupError, match="no platform type 'loopback'"):
        open_platform(kernel, PlatformInstance("loop-3", "loopback"))


@pytest.mark.anyio
async def test_a_closed_instance_leaves_nothing_in_its_plugins_scope(kernel: Kernel) -> None:
    rec = kernel.plugins.record("loopback_chat")
    assert rec.generation is not None and rec.generation.scope is not None
    scope = rec.generation.scope
    before = len(scope._callbacks)
    for n in range(3):
        handle = open_platform(kernel, PlatformInstance(f"loop-{n}", "loopback"))
        await handle.close()
    assert len(scope._callbacks) == before


def test_a_call_api_adapter_is_recognised() -> None:
    class OneBotLike:
        async def call_api(self, name: str, params: Any) -> Any:
            return {"name": name}

    assert isinstance(OneBotLike(), SupportsCallApi)
