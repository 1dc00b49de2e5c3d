"""The `/ws` hub over a real server: actions and their errors, the `logs` and `events`
channels, plugin channels that come and go, and slow subscribers that never stall
anyone else.

Every test runs twice: with the connections handed to the relay process (how `nekobot
run` serves) and served by the hub in-process (any other ASGI server)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import websockets

from builtin_plugins.api import fanout
from builtin_plugins.api.fanout import PRIVATE_LIMIT, RING_SIZE
from kernel.testing import PATIENCE, MockBot
from tests.builtin_plugins.conftest import WS_MODES, ApiServer
from tests.plugin_factory import purge_modules, write_plugin

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("api", WS_MODES, indirect=True)]
log = logging.getLogger("nekobot.tests.ws")

FEED_PLUGIN = """
from kernel import ChannelSpec, CommandSpec, hookimpl

STATE = {}

async def greet():
    return {"hello": "new subscriber"}

async def on_message(data):
    return {"echo": data}

async def tick(cmd):
    STATE["ctx"].publish("zws_feed.ticks", {"n": cmd.args})
    return "ticked"

@hookimpl
def nekobot_ws_channels():
    return [ChannelSpec("zws_feed.ticks", "ticks", on_subscribe=greet, on_message=on_message)]

@hookimpl
def nekobot_commands():
    return [CommandSpec("zws_tick", tick)]

@hookimpl
async def nekobot_plugin_start(ctx):
    STATE["ctx"] = ctx
"""


async def counters(api: ApiServer) -> dict[str, Any]:
    """The counters of whichever side serves the connections (`Fanout.stats`)."""
    stats = await api.hub.stats()
    relay = stats["relay"]
    if relay is not None and relay["subscribers"]:
        assert not stats["in_process"]["subscribers"]
        return dict(relay)
    return dict(stats["in_process"])


@asynccontextmanager
async def connect(api: ApiServer, **kwargs: Any) -> AsyncIterator[websockets.ClientConnection]:
    async with websockets.connect(api.ws_url(), additional_headers=api.headers, **kwargs) as ws:
        yield ws


async def send(ws: websockets.ClientConnection, frame: Any) -> None:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))


async def recv_until(
    ws: websockets.ClientConnection, pred: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first message matching `pred` (others, e.g. log records, are skipped)."""
    with anyio.fail_after(PATIENCE):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if pred(message):
                return message


def of_type(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == kind


async def subscribe(ws: websockets.ClientConnection, *channels: str) -> dict[str, Any]:
    await send(ws, {"action": "subscribe", "channels": list(channels)})
    return await recv_until(ws, lambda m: m["type"] in ("subscribed", "error"))


async def test_actions_and_their_errors(api: ApiServer) -> None:
    async with connect(api) as ws:
        await send(ws, {"action": "ping"})
        assert await recv_until(ws, lambda m: True) == {"type": "pong"}
        for frame, fragment in (
            ("{not json", "JSON"),
            ("[1, 2]", "object"),
            ({"action": "dance"}, "dance"),
            ({"no_action": 1}, "action"),
            ({"action": "subscribe", "channels": "logs"}, "channels"),
            ({"action": "subscribe", "channels": [1]}, "channels"),
            ({"action": "subscribe"}, "channels"),
            ({"action": "subscribe", "channels": ["no.such.channel"]}, "no.such.channel"),
            ({"action": "message", "channel": "logs", "data": 1}, "logs"),
        ):
            await send(ws, frame)
            message = await recv_until(ws, lambda m: True)
            assert message["type"] == "error", (frame, message)
            assert fragment in message["message"], (frame, message)
        # A bad frame does not end the connection, nor change subscriptions.
        assert await subscribe(ws, "events") == {"type": "subscribed", "channels": ["events"]}
        assert await subscribe(ws, "logs") == {
            "type": "subscribed",
            "channels": ["events", "logs"],
        }
        # Unknown channels in a list: nothing of it is subscribed.
        reply = await subscribe(ws, "logs", "nope")
        assert reply["type"] == "error" and "nope" in reply["message"]
        await send(ws, {"action": "unsubscribe", "channels": ["logs"]})
        assert await recv_until(ws, of_type("unsubscribed")) == {
            "type": "unsubscribed",
            "channels": ["logs"],
        }
        await send(ws, {"action": "ping"})
        await recv_until(ws, of_type("pong"))
        # Nothing from `logs` arrives any more; `events` still does.
        log.warning("zws: after unsubscribe")
        async with api.authed() as c:
            await c.post("/api/plugins/disable", json={"name": "help"})
        event = await recv_until(ws, lambda m: m["type"] == "message")
        assert event["channel"] == "events"


async def test_events_channel_reports_plugin_changes(api: ApiServer) -> None:
    async with connect(api) as ws:
        await subscribe(ws, "events")
        async with api.authed() as c:
            assert (await c.post("/api/plugins/disable", json={"name": "help"})).is_success
            assert (await c.post("/api/plugins/enable", json={"name": "help"})).is_success
            assert (await c.post("/api/plugins/reload", json={"name": "help"})).is_success
        seen = []
        while len(seen) < 3:
            m = await recv_until(ws, lambda m: m.get("channel") == "events")
            if m["data"]["plugin"] == "help":
                seen.append(m["data"]["type"])
        assert seen == ["plugin.disabled", "plugin.enabled", "plugin.reloaded"]
        assert set(m["data"]) >= {"type", "plugin", "time", "data"}


async def test_logs_channel_streams_records(api: ApiServer) -> None:
    async with connect(api) as ws:
        await subscribe(ws, "logs")
        log.warning("zws: a record for the logs channel")
        m = await recv_until(
            ws, lambda m: m.get("channel") == "logs" and "zws: a record" in m["data"]["message"]
        )
        record = m["data"]
        assert record["level"] == "WARNING" and record["logger"] == "nekobot.tests.ws"
        assert set(record) >= {"seq", "time", "level", "logger", "plugin", "message"}
        # The same record is in /api/logs.
        async with api.authed() as c:
            r = await c.get("/api/logs", params={"q": "a record for the logs channel"})
            assert [i["seq"] for i in r.json()["data"]["items"]] == [record["seq"]]


async def test_plugin_channel_and_its_disappearance(api: ApiServer) -> None:
    purge_modules("zws_feed")
    write_plugin(api.plugin_dir, "zws_feed", FEED_PLUGIN)
    bot = MockBot(api.kernel)
    async with api.authed() as c:
        assert (await c.post("/api/plugins/rescan")).is_success
        assert (await c.post("/api/plugins/enable", json={"name": "zws_feed"})).is_success
    async with connect(api) as ws, connect(api) as bystander:
        await subscribe(bystander, "events")
        reply = await subscribe(ws, "zws_feed.ticks")
        assert reply == {"type": "subscribed", "channels": ["zws_feed.ticks"]}
        greeting = await recv_until(ws, of_type("message"))
        assert greeting == {
            "type": "message",
            "channel": "zws_feed.ticks",
            "data": {"hello": "new subscriber"},
        }
        assert await bot.receive("/zws_tick 7") == ["ticked"]
        m = await recv_until(ws, of_type("message"))
        assert m == {"type": "message", "channel": "zws_feed.ticks", "data": {"n": "7"}}
        # Messages to the channel reach the plugin.
        await send(ws, {"action": "message", "channel": "zws_feed.ticks", "data": [1]})
        assert (await recv_until(ws, of_type("message")))["data"] == {"echo": [1]}

        # A reload keeps the channel and its subscribers; the new generation publishes.
        async with api.authed() as c:
            assert (await c.post("/api/plugins/reload", json={"name": "zws_feed"})).is_success
        assert await bot.receive("/zws_tick 9") == ["ticked"]
        m = await recv_until(ws, lambda m: m["type"] != "message" or m["data"] == {"n": "9"})
        assert m == {"type": "message", "channel": "zws_feed.ticks", "data": {"n": "9"}}

        async with api.authed() as c:
            assert (await c.post("/api/plugins/disable", json={"name": "zws_feed"})).is_success
        gone = await recv_until(ws, of_type("unsubscribed"))
        assert gone["channels"] == ["zws_feed.ticks"] and gone["reason"]
        reply = await subscribe(ws, "zws_feed.ticks")
        assert reply["type"] == "error"
        # Subscribers of other channels are not told anything about it.
        await send(bystander, {"action": "ping"})
        m = await recv_until(bystander, lambda m: m["type"] != "message")
        assert m == {"type": "pong"}

        # Back again: subscribable again, and publishing works.
        async with api.authed() as c:
            assert (await c.post("/api/plugins/enable", json={"name": "zws_feed"})).is_success
        assert (await subscribe(ws, "zws_feed.ticks"))["type"] == "subscribed"
        await bot.receive("/zws_tick 8")
        m = await recv_until(ws, lambda m: m.get("data") == {"n": "8"})
        assert m["channel"] == "zws_feed.ticks"


async def test_a_stalled_subscriber_stalls_nobody(api: ApiServer) -> None:
    """A subscriber that reads nothing neither delays log delivery to a reading one nor
    message handling, and its queue is bounded."""
    bot = MockBot(api.kernel)
    padding = "x" * 4000  # ~20 MB in all: more than the socket buffers hold
    # The stalled client reads nothing after subscribing: its library stops reading from
    # the socket once a frame is queued, its socket buffer is small, and it does not
    # compress (which would shrink the padding to nothing).
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(api.base_url.rsplit(":", 1)[1])))
    stalled_client = connect(api, max_queue=1, close_timeout=0.2, sock=sock, compression=None)
    async with stalled_client as stalled:
        await subscribe(stalled, "logs")
        async with connect(api, max_size=None) as reader:
            await subscribe(reader, "logs")
            assert (await counters(api))["subscribers"] == 2
            received: list[dict[str, Any]] = []
            got_marker = anyio.Event()

            async def read() -> None:
                async for raw in reader:
                    message = json.loads(raw)
                    received.append(message)
                    if "zws-final-marker" in message.get("data", {}).get("message", ""):
                        got_marker.set()
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                for batch in range(200):
                    for i in range(25):
                        log.info("zws burst %d %s", batch * 25 + i, padding)
                    await anyio.sleep(0.001)  # paces the flood: messages go on meanwhile
                    if batch % 50 == 0:
                        # Messages are handled all the while, and the queues are bounded:
                        # a ring per channel, a cursor per reader.
                        with anyio.fail_after(PATIENCE):
                            assert await bot.receive("/help help")
                        now = await counters(api)
                        assert now["ring_sizes"].get("logs", 0) <= RING_SIZE
                        assert max(now["private"]) <= PRIVATE_LIMIT
                # The reader gets the newest records promptly (a marker, repeated until
                # seen: a reader that fell behind skips what does not fit its queue).
                with anyio.fail_after(PATIENCE):
                    while not got_marker.is_set():
                        log.info("zws-final-marker")
                        with anyio.move_on_after(0.05):
                            await got_marker.wait()
                with anyio.fail_after(PATIENCE):
                    assert await bot.receive("/help help")

            bursts = [m for m in received if "zws burst" in m.get("data", {}).get("message", "")]
            assert len(bursts) > 100
            # The stalled one really was stalled (else this test proves nothing): far
            # behind the channel, sent much less than the reader; nobody was dropped.
            now = await counters(api)
            assert now["subscribers"] == 2 and now["dropped"] == 0
            assert max(now["behind"]) > RING_SIZE // 2
            assert min(now["sent"]) < max(now["sent"]) / 2
            # The reader is still served.
            await send(reader, {"action": "ping"})
            await recv_until(reader, of_type("pong"))


async def test_a_peer_that_stops_reading_is_dropped(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "SEND_TIMEOUT", 0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(api.base_url.rsplit(":", 1)[1])))
    async with connect(api, max_queue=1, close_timeout=0.2, sock=sock, compression=None) as ws:
        await subscribe(ws, "logs")
        assert (await counters(api))["subscribers"] == 1
        padding = "y" * 4000
        with anyio.fail_after(PATIENCE):
            while (await counters(api))["subscribers"]:
                for i in range(50):
                    log.info("zws flood %d %s", i, padding)
                await anyio.sleep(0.01)  # paces the flood (the condition is the server's)


async def test_a_burst_makes_a_reader_skip_not_drop(api: ApiServer) -> None:
    """A burst larger than the ring in one loop step: the reader gets every record or is
    told how many it missed, gets the newest ones, and is not disconnected. (In-process
    the writer runs after the whole burst, so it must skip; the relay takes the burst in
    chunks as it arrives and may keep up.)"""
    total = RING_SIZE + 500
    async with connect(api, max_size=None) as ws:
        await subscribe(ws, "logs")
        for i in range(total):
            log.info("zws burst-skip %d", i)
        got: list[int] = []
        skipped = 0
        with anyio.fail_after(PATIENCE):
            while not got or got[-1] != total - 1:
                m = json.loads(await ws.recv())
                if m["type"] == "skipped":
                    assert m["channel"] == "logs"
                    skipped += m["count"]
                elif m.get("channel") == "logs" and "zws burst-skip" in m["data"]["message"]:
                    got.append(int(m["data"]["message"].rsplit(" ", 1)[1]))
        assert got == sorted(got)
        assert len(got) + skipped >= total
        if api.hub.relay is None:
            assert skipped >= 500
        now = await counters(api)
        assert now["subscribers"] == 1 and now["dropped"] == 0
        await send(ws, {"action": "ping"})
        await recv_until(ws, of_type("pong"))


async def test_batch_frames(api: ApiServer) -> None:
    async with connect(api, max_size=None) as ws:
        await send(ws, {"action": "subscribe", "channels": ["logs"], "batch": True})
        reply = await recv_until(ws, lambda m: m["type"] in ("subscribed", "batch"))
        if reply["type"] == "batch":
            reply = (
                json.loads(reply["messages"][0])
                if isinstance(reply["messages"][0], str)
                else reply["messages"][0]
            )
        assert reply["type"] == "subscribed"
        assert reply["batch"] is True
        for i in range(300):
            log.info("zws batched %d", i)
        seen: list[str] = []
        with anyio.fail_after(PATIENCE):
            while len(seen) < 300:
                frame = json.loads(await ws.recv())
                assert frame["type"] == "batch"
                seen.extend(
                    m["data"]["message"]
                    for m in frame["messages"]
                    if m.get("channel") == "logs" and m["data"]["message"].startswith("zws batched")
                )
        assert seen == [f"zws batched {i}" for i in range(300)]
        await send(ws, {"action": "subscribe", "channels": ["logs"], "batch": "yes"})
        err = await recv_until(
            ws, lambda m: any(x.get("type") == "error" for x in m.get("messages", [m]))
        )
        assert "batch" in json.dumps(err)


async def test_reloading_the_hub_tells_clients_to_reconnect(api: ApiServer) -> None:
    async with connect(api) as ws:
        await subscribe(ws, "events")
        async with api.authed() as c:
            r = await c.post("/api/plugins/reload", json={"name": "api"})
            assert r.status_code == 200, r.text
        with anyio.fail_after(PATIENCE), pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    # The new generation's hub serves.
    async with connect(api) as ws:
        await subscribe(ws, "events")
        async with api.authed() as c:
            assert (await c.post("/api/plugins/disable", json={"name": "help"})).is_success
        m = await recv_until(ws, lambda m: m.get("channel") == "events")
        assert m["data"]["type"] == "plugin.disabled"


DUP_PLUGIN = """
from kernel import CommandSpec, hookimpl

async def dup(cmd):
    return "{name}"

@hookimpl
def nekobot_commands():
    return [CommandSpec("zws_dup", dup)]
"""


async def test_events_channel_reports_failures_config_and_conflicts(api: ApiServer) -> None:
    for name in ("zws_one", "zws_two"):
        purge_modules(name)
        write_plugin(api.plugin_dir, name, DUP_PLUGIN.replace("{name}", name))
    async with connect(api) as ws, api.authed() as c:
        await subscribe(ws, "events")
        await c.post("/api/plugins/rescan")

        def event(kind: str, plugin: str | None = None) -> Callable[[dict[str, Any]], bool]:
            return lambda m: (
                m.get("channel") == "events"
                and m["data"]["type"] == kind
                and (plugin is None or m["data"]["plugin"] == plugin)
            )

        assert (await c.post("/api/plugins/enable", json={"name": "zws_one"})).is_success
        assert (await c.post("/api/plugins/enable", json={"name": "zws_two"})).is_success
        m = await recv_until(ws, event("command.conflicts", "zws_two"))
        (conflict,) = m["data"]["data"]["conflicts"]
        assert conflict["key"] == "zws_dup"
        assert {c["plugin"] for c in conflict["candidates"]} == {"zws_one", "zws_two"}

        r = await c.post(
            "/api/commands/conflicts/resolve", json={"key": "zws_dup", "plugin": "zws_two"}
        )
        assert r.is_success
        await recv_until(ws, event("command.conflict_resolved"))

        write_plugin(api.plugin_dir, "zws_one", "this is not python\n")
        assert (await c.post("/api/plugins/reload", json={"name": "zws_one"})).status_code == 422
        m = await recv_until(ws, event("plugin.failed", "zws_one"))
        assert m["data"]["data"]["error"]

        r = await c.put("/api/plugins/config", json={"name": "zws_two", "config": {}})
        assert r.is_success
        await recv_until(ws, event("plugin.config_changed", "zws_two"))
        assert (await c.put("/api/settings", json={"ui": {"x": 1}})).is_success
        await recv_until(ws, event("settings.changed"))
        assert (await c.put("/api/bot/config", json={"wake_words": ["z"]})).is_success
        await recv_until(ws, event("bot_config.changed"))


async def test_a_binary_frame_is_an_error_not_the_end(api: ApiServer) -> None:
    async with connect(api) as ws:
        await ws.send(b"\x00\x01")
        message = await recv_until(ws, lambda m: True)
        assert message["type"] == "error" and "text" in message["message"], message
        await send(ws, {"action": "ping"})
        assert await recv_until(ws, lambda m: True) == {"type": "pong"}


async def test_a_message_published_from_a_thread_is_what_was_published(api: ApiServer) -> None:
    hub = api.hub
    async with connect(api) as ws:
        await subscribe(ws, "events")

        def publish_then_change() -> None:
            data = {"zws_n": 1}
            hub.publish("events", data)
            data["zws_n"] = 2  # the caller's own object: the message must not follow it

        # Joined without awaiting: the loop runs nothing until the thread is done.
        thread = threading.Thread(target=publish_then_change)
        thread.start()
        thread.join()
        message = await recv_until(ws, lambda m: "zws_n" in m.get("data", {}))
        assert message["data"] == {"zws_n": 1}


async def test_nothing_is_kept_while_nobody_listens(api: ApiServer) -> None:
    hub = api.hub
    log.warning("zws: nobody listens")
    assert hub.rings == {}  # a subscriber only gets what comes after it subscribed
    async with connect(api) as ws:
        await subscribe(ws, "logs")
        log.warning("zws: somebody listens")
        message = await recv_until(ws, lambda m: m["type"] == "message")
        assert "zws: somebody listens" in message["data"]["message"]


async def test_a_lone_surrogate_breaks_nothing(api: ApiServer) -> None:
    """A string with no UTF-8 encoding (a file name decoded with surrogateescape, say)
    arrives as its JSON escape, and what is published after it arrives too."""
    hub = api.hub
    async with connect(api) as ws:
        await subscribe(ws, "events")
        hub.publish("events", {"zws_path": "/tmp/\udcff"})
        hub.publish("events", {"zws_path": "/tmp/ok"})
        first = await recv_until(ws, lambda m: "zws_path" in m.get("data", {}))
        assert first["data"] == {"zws_path": "/tmp/\udcff"}
        second = await recv_until(ws, lambda m: "zws_path" in m.get("data", {}))
        assert second["data"] == {"zws_path": "/tmp/ok"}


ORDER_PLUGIN = """
import anyio
from kernel import ChannelSpec, hookimpl

RUNNING = []
ALL_SENT = None  # set by the test: an anyio.Event, set once it sent every frame

async def on_message(data):
    RUNNING.append(data)
    try:
        if data == 0:
            # In flight until the others were sent, then a while longer: a window for a
            # hub that runs a connection's messages alongside each other to show it. A
            # slow machine can only narrow the window, never fail a hub that is right.
            with anyio.fail_after(30):
                await ALL_SENT.wait()
            await anyio.sleep(0.2)
        return {"echo": data, "alongside": len(RUNNING) - 1}
    finally:
        RUNNING.remove(data)

@hookimpl
def nekobot_ws_channels():
    return [ChannelSpec("zws_order.q", "questions", on_message=on_message)]
"""


async def test_a_connections_messages_are_answered_in_order_one_at_a_time(
    api: ApiServer,
) -> None:
    purge_modules("zws_order")
    write_plugin(api.plugin_dir, "zws_order", ORDER_PLUGIN)
    async with api.authed() as c:
        assert (await c.post("/api/plugins/rescan")).is_success
        assert (await c.post("/api/plugins/enable", json={"name": "zws_order"})).is_success
    plugin = sys.modules["zws_order"]
    plugin.ALL_SENT = anyio.Event()
    async with connect(api) as ws:
        for n in range(3):  # the first one is slow
            await send(ws, {"action": "message", "channel": "zws_order.q", "data": n})
        await send(ws, {"action": "ping"})
        plugin.ALL_SENT.set()
        got = [await recv_until(ws, lambda m: m["type"] in ("message", "pong")) for _ in range(4)]
        assert got[:3] == [
            {"type": "message", "channel": "zws_order.q", "data": {"echo": n, "alongside": 0}}
            for n in range(3)
        ]
        assert got[3] == {"type": "pong"}
