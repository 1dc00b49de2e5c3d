"""The `/ws` protocol core without I/O (rings, cursors, shared frames, actions), and the
relay process's connections run in the test's loop."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from builtin_plugins.api import fanout
from builtin_plugins.api.fanout import (
    WRITE_BUFFER_HIGH,
    Fanout,
    Relay,
    Subscriber,
    encode,
    text_frame,
)
from kernel.testing import PATIENCE, wait_until


def make(channels: tuple[str, ...] = ("logs", "events", "zz.plug")) -> Fanout:
    return Fanout(lambda name: name in channels, lambda: None)


def subscribed(hub: Fanout, *channels: str, batch: bool = False) -> Subscriber:
    sub = Subscriber()
    hub.subscribers.add(sub)
    frame = {"action": "subscribe", "channels": list(channels), "batch": batch}
    hub.handle(sub, json.dumps(frame))
    sub.private.clear()
    return sub


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_is_what_a_websocket_server_sends(size: int) -> None:
    text = "é" * (size // 2) + "a" * (size % 2)
    assert text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


def test_subscribers_in_the_same_place_share_one_frame() -> None:
    hub = make()
    a, b = subscribed(hub, "logs", batch=True), subscribed(hub, "logs", batch=True)
    for i in range(3):
        hub.append("logs", encode({"n": i}))
    cache: dict[tuple[object, ...], tuple[bytes, int]] = {}
    first = hub.frames_shared(a, cache, text_frame)
    assert hub.frames_shared(b, cache, text_frame) is first  # built once
    batch = json.loads(first[2:])  # a 2-byte header: the frame is short
    assert batch == {"type": "batch", "messages": [{"n": 0}, {"n": 1}, {"n": 2}]}
    assert a.cursors == b.cursors == {"logs": 3}
    assert hub.frames_shared(a, {}, text_frame) == b""


def test_a_shared_frame_counts_what_each_subscriber_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fanout, "RING_SIZE", 4)
    hub = make()
    a, b = subscribed(hub, "logs"), subscribed(hub, "logs")
    for i in range(10):
        hub.append("logs", encode({"n": i}))
    cache: dict[tuple[object, ...], tuple[bytes, int]] = {}
    assert hub.frames_shared(a, cache, text_frame) == hub.frames_shared(b, cache, text_frame)
    assert a.skipped_total == b.skipped_total == 6
    assert hub.stats()["behind"] == [0, 0]


def test_a_private_reply_comes_first_and_is_not_shared() -> None:
    hub = make()
    a, b = subscribed(hub, "logs"), subscribed(hub, "logs")
    hub.append("logs", encode({"n": 1}))
    hub.handle(a, json.dumps({"action": "ping"}))
    cache: dict[tuple[object, ...], tuple[bytes, int]] = {}
    mine = hub.frames_shared(a, cache, lambda text: text.encode() + b"|")
    theirs = hub.frames_shared(b, cache, lambda text: text.encode() + b"|")
    assert mine == b'{"type":"pong"}|{"n":1}|'
    assert theirs == b'{"n":1}|'


def test_plugin_channels_are_greeted_builtin_ones_are_not() -> None:
    hub = make()
    sub = Subscriber()
    followups = hub.handle(
        sub, json.dumps({"action": "subscribe", "channels": ["logs", "zz.plug"]})
    )
    assert followups == [("greet", "zz.plug", None)]
    message = {"action": "message", "channel": "zz.plug", "data": [1]}
    assert hub.handle(sub, json.dumps(message)) == [("message", "zz.plug", [1])]
    assert hub.handle(sub, json.dumps({"action": "message", "channel": 3})) == []
    assert "channel" in json.loads(sub.private[-1])["message"]


@pytest.mark.parametrize("text", ["NaN", "[" * 100_000, '{"action": "ping", "x": Infinity}', None])
def test_bad_frames_are_answered_not_raised(text: str | None) -> None:
    hub = make()
    sub = Subscriber()
    assert hub.handle(sub, text) == []
    assert json.loads(sub.private[-1])["type"] == "error"


def test_a_lone_surrogate_is_sent_as_its_escape() -> None:
    # A file name decoded with surrogateescape, say: it has no UTF-8 encoding.
    text = encode({"message": "bad \udcff name", "ok": "é"})
    assert text.encode()  # no UnicodeEncodeError
    assert json.loads(text) == {"message": "bad \udcff name", "ok": "é"}


# -- the relay process's connections, run in this loop ---------------------------------


@asynccontextmanager
async def relay_here(**options: float) -> AsyncIterator[tuple[Relay, socket.socket]]:
    """A `Relay` in this loop, and the bot's end of its control socket."""
    bot, theirs = socket.socketpair()
    theirs.setblocking(False)
    opts = {
        "send_timeout": 60.0,
        "auth_grace": 60.0,
        "batch_interval": 0.01,
        "ping_interval": 60.0,
        **options,
    }
    relay = Relay(theirs, argparse.Namespace(**opts))
    relay.loop.add_reader(theirs.fileno(), relay.on_control)
    relay.loop.call_later(relay.ping_interval, relay.keepalive)
    try:
        yield relay, bot
    finally:
        relay.loop.remove_reader(theirs.fileno())
        for conn in list(relay.conns.values()):
            if conn.transport is not None:
                conn.transport.abort()
        await anyio.lowlevel.checkpoint()  # connection_lost callbacks
        theirs.close()
        bot.close()


def op_line(op: dict[str, Any]) -> bytes:
    return b"c\t" + json.dumps(op).encode() + b"\n"


def hand_over(
    bot: socket.socket, conn: int, authed: bool, then: tuple[dict[str, Any], ...] = ()
) -> tuple[socket.socket, ClientProtocol]:
    """Hand the relay a connection as the bot does (`then`: ops sent in the same write);
    returns the client's socket and protocol."""
    client_proto = ClientProtocol(parse_uri("ws://127.0.0.1/ws"))
    client_proto.send_request(client_proto.connect())
    request = b"".join(client_proto.data_to_send())
    client, server = socket.socketpair()
    client.setblocking(False)
    adopt = {"op": "adopt", "conn": conn, "authed": authed, "request": request.decode()}
    data = op_line(adopt) + b"".join(op_line(op) for op in then)
    socket.send_fds(bot, [data], [server.fileno()])
    server.close()
    return client, client_proto


def adopted(relay: Relay, conn: int) -> Callable[[], bool]:
    """Whether the relay has adopted connection `conn` (it does so in a task of its own,
    which offers nothing to wait on: polled with `wait_until`)."""
    return lambda: conn in relay.conns and relay.conns[conn].transport is not None


async def read_frames(
    client: socket.socket, proto: ClientProtocol, until: Callable[[list[Any]], bool]
) -> list[Any]:
    """What the client gets (the handshake response, frames), read as it arrives until
    `until(what came so far)` holds, or the relay closes the socket."""
    events: list[Any] = []
    with anyio.fail_after(PATIENCE):
        while not until(events):
            await anyio.wait_readable(client)
            try:
                data = client.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                break
            proto.receive_data(data)
            events.extend(proto.events_received())
    return events


async def answer_pings(client: socket.socket, proto: ClientProtocol) -> None:
    """Read what comes, and answer each ping (the client protocol queues the pong) as
    soon as it arrives."""
    while True:
        await read_frames(client, proto, lambda events: bool(events))
        for data in proto.data_to_send():
            client.send(data)


@pytest.mark.anyio
async def test_a_close_sent_with_the_adoption_is_not_lost() -> None:
    async with relay_here() as (relay, bot):
        close = {"op": "close", "conn": 1, "code": 4401, "reason": "token expired or revoked"}
        client, proto = hand_over(bot, 1, authed=True, then=(close,))
        with client:
            await wait_until(adopted(relay, 1))
            events = await read_frames(client, proto, lambda events: len(events) >= 2)
            assert [type(e).__name__ for e in events] == ["Response", "Frame"]
            assert events[1].opcode is Opcode.CLOSE
            assert proto.close_rcvd is not None and proto.close_rcvd.code == 4401


async def fill_write_buffer(relay: Relay, conn: int) -> None:
    """The client reads nothing: the relay's writes to it back up until it is paused."""
    transport = relay.conns[conn].transport
    assert transport is not None
    transport.write(b"\0" * (4 << 20))
    assert relay.conns[conn].paused


@pytest.mark.anyio
async def test_an_unauthenticated_peer_that_reads_nothing_is_closed_in_time() -> None:
    async with relay_here(auth_grace=0.3) as (relay, bot):
        client, _ = hand_over(bot, 1, authed=False)
        with client:
            await wait_until(adopted(relay, 1))
            await fill_write_buffer(relay, 1)
            # The authentication deadline still holds (then the closing one).
            await wait_until(lambda: 1 not in relay.conns)


@pytest.mark.anyio
async def test_a_protocol_error_from_a_peer_that_reads_nothing_ends_it() -> None:
    async with relay_here(send_timeout=0.3) as (relay, bot):
        client, _ = hand_over(bot, 1, authed=True)
        with client:
            await wait_until(adopted(relay, 1))
            await fill_write_buffer(relay, 1)
            client.send(Frame(Opcode.TEXT, b"unmasked").serialize(mask=False))
            await wait_until(lambda: 1 not in relay.conns)


@pytest.mark.anyio
async def test_pings_from_a_peer_that_reads_nothing_do_not_pile_up() -> None:
    async with relay_here() as (relay, bot):
        client, _ = hand_over(bot, 1, authed=True)
        with client:
            await wait_until(adopted(relay, 1))
            transport = relay.conns[1].transport
            assert transport is not None
            pings = memoryview(Frame(Opcode.PING, b"p" * 125).serialize(mask=True) * 40_000)
            sent = 0
            # ~5 MB of pings (as many pongs) until the relay stops reading: its writes
            # to a client that reads nothing back up, and it must not read more meanwhile.
            with anyio.fail_after(PATIENCE):
                while transport.is_reading() and sent < len(pings):
                    with contextlib.suppress(BlockingIOError):
                        sent += client.send(pings[sent : sent + (1 << 16)])
                    await anyio.lowlevel.checkpoint()  # the relay reads (or pauses)
            # The client could not send everything, and what waits for it stays near
            # the buffer limit.
            assert not relay.conns[1].closing
            assert sent < len(pings)
            assert transport.get_write_buffer_size() < 2 * WRITE_BUFFER_HIGH


@pytest.mark.anyio
async def test_a_peer_that_answers_no_ping_is_closed() -> None:
    # An interval long enough for the answering peer to answer each ping before the
    # next however loaded the machine; the silent one is closed at the second.
    async with relay_here(ping_interval=0.5) as (relay, bot):
        silent, _ = hand_over(bot, 1, authed=True)
        answering, proto = hand_over(bot, 2, authed=True)
        with silent, answering:
            await wait_until(adopted(relay, 1))
            async with anyio.create_task_group() as tg:
                tg.start_soon(answer_pings, answering, proto)
                await wait_until(lambda: 1 not in relay.conns or relay.conns[1].closing)
                tg.cancel_scope.cancel()
            assert 2 in relay.conns and not relay.conns[2].closing
