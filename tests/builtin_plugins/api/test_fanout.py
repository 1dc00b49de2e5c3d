"""The `/ws` protocol core without I/O: rings, cursors, shared frames, actions."""

from __future__ import annotations

import json

import pytest
from websockets.frames import Frame, Opcode

from builtin_plugins.api import fanout
from builtin_plugins.api.fanout import Fanout, Subscriber, encode, text_frame


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
