"""The `/ws` protocol without I/O, and the relay process that serves it.

`Fanout` holds what the hub knows: each channel's ring of encoded messages, each
subscriber's cursors and private replies, and the client actions (`subscribe`,
`unsubscribe`, `ping`, ...). Publishing costs the same whatever the number of
subscribers: a message is encoded once and appended to its channel's ring; each
subscriber is sent what is new since its cursor. One that falls more than a ring behind
skips (and is told how many it missed).

Two servers use it: the in-process hub (`hub.py`, on the bot's event loop) and the relay
process below, to which the bot hands accepted `/ws` connections (see `kernel.server`),
so that writing the frames costs the bot's loop nothing. The relay runs this file as a
script (`python -I fanout.py --control FD ...`): it imports nothing but the standard
library and `websockets`, so it starts in a fraction of the bot's start-up time.

Relay wire format, one line per item on a Unix stream socket (JSON never holds a raw
newline): `m<TAB>channel<TAB>text` publishes an encoded message; `c<TAB>{json}` is a
control operation. A connection's socket travels as an `SCM_RIGHTS` descriptor with
its `adopt` line (descriptors queue in order; each `adopt` takes the next one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

BUILTIN_CHANNELS = ("logs", "events")
#: Messages a channel keeps for subscribers that are behind.
RING_SIZE = 4096
#: Replies (pong, errors, ...) queued for one connection before it counts as stuck.
PRIVATE_LIMIT = 256
#: A send that has not completed after this long means the peer stopped reading.
SEND_TIMEOUT = 10.0
#: Batch frames are sent at most this often per connection.
BATCH_INTERVAL = 0.025
#: How long an unauthenticated connection may take to send its `auth` frame.
AUTH_GRACE_SECONDS = 5.0
#: How often an open connection's token is checked for revocation.
TOKEN_CHECK_SECONDS = 5.0
#: Largest frame a client may send.
MAX_CLIENT_MESSAGE = 1 << 20
#: Each connection is pinged this often; one that has not answered by the next ping is
#: closed (1011), as uvicorn does for the connections the bot serves itself.
PING_INTERVAL = 20.0

#: A follow-up the bot must run for a client action: ("greet", channel, None) after a
#: subscription to a plugin channel, ("message", channel, data) for a channel's handler.
Followup = tuple[str, str, Any]


def encode(message: Mapping[str, Any]) -> str:
    """A message as the text of one frame (always valid UTF-8)."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (a file name decoded with surrogateescape, say) has no
            # UTF-8: it is sent as its JSON escape, which decodes to the same string.
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str) -> Any:
    """Strict JSON: any bad input (NaN, nesting too deep) is a ValueError."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class ChannelRing:
    """The last `RING_SIZE` encoded messages of one channel, with sequence numbers."""

    def __init__(self, size: int | None = None) -> None:
        self.items: deque[str] = deque(maxlen=size or RING_SIZE)
        self.next_seq = 0

    def append(self, text: str) -> None:
        """Add one message (the oldest falls out when full)."""
        self.items.append(text)
        self.next_seq += 1

    def since(self, cursor: int) -> tuple[list[str], int]:
        """The messages from `cursor` on, and how many before them were already gone."""
        oldest = self.next_seq - len(self.items)
        start = max(cursor, oldest)
        count = self.next_seq - start
        # From the right: O(new messages), not O(ring).
        new = list(islice(reversed(self.items), count))
        new.reverse()
        return new, start - cursor


class Subscriber:
    """One WebSocket connection: its cursors per channel and its pending replies."""

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self._wake = wake
        self.cursors: dict[str, int] = {}
        self.private: deque[str] = deque()
        self.batch = False
        self.skipped_total = 0
        self.sent = 0
        self.dropped = False
        #: Set when the connection's token expired or was revoked.
        self.token_invalid = False
        #: Called once when the subscriber is dropped: ends its connection.
        self.on_drop: Callable[[], None] | None = None

    def reply(self, message: Mapping[str, Any]) -> None:
        """Queue a message for this connection only (dropped if it piles up)."""
        self.reply_text(encode(message))

    def reply_text(self, text: str) -> None:
        """Queue an encoded message for this connection only."""
        if self.dropped:
            return
        self.private.append(text)
        if len(self.private) > PRIVATE_LIMIT:
            self.drop()
        else:
            self._wake()

    def drop(self) -> None:
        """End the connection (its writer may be stuck in a send to a peer that reads
        nothing: ending it frees it)."""
        if self.dropped:
            return
        self.dropped = True
        if self.on_drop is not None:
            self.on_drop()


class Fanout:
    """Channels, subscribers and the client actions, without I/O."""

    def __init__(self, channel_exists: Callable[[str], bool], wake: Callable[[], None]) -> None:
        self.channel_exists = channel_exists
        self.wake = wake
        self.subscribers: set[Subscriber] = set()
        self.rings: dict[str, ChannelRing] = {}
        self.published = 0

    def append(self, channel: str, text: str) -> None:
        """Publish an encoded message on `channel`."""
        ring = self.rings.get(channel)
        if ring is None:
            ring = self.rings[channel] = ChannelRing()
        ring.append(text)
        self.published += 1
        self.wake()

    def pending(self, sub: Subscriber) -> list[str]:
        """What `sub` has not been sent yet: its replies, then each channel's news."""
        out = list(sub.private)
        sub.private.clear()
        for channel, cursor in sub.cursors.items():
            ring = self.rings.get(channel)
            if ring is None or ring.next_seq == cursor:
                continue
            new, skipped = ring.since(cursor)
            sub.cursors[channel] = ring.next_seq
            if skipped:
                sub.skipped_total += skipped
                out.append(encode({"type": "skipped", "channel": channel, "count": skipped}))
            out.extend(new)
        return out

    def frames(self, sub: Subscriber) -> list[str]:
        """The frames to send `sub` now: one batch frame, or one per message."""
        pending = self.pending(sub)
        if sub.batch and pending:
            return ['{"type":"batch","messages":[' + ",".join(pending) + "]}"]
        return pending

    def frames_shared(
        self,
        sub: Subscriber,
        cache: dict[tuple[Any, ...], tuple[bytes, int]],
        wire: Callable[[str], bytes],
    ) -> bytes:
        """`frames`, as bytes on the wire (`wire(text)` makes one frame), built once for
        every subscriber in the same place: with no private reply queued, what a
        subscriber is sent depends only on its cursors and its batch flag."""
        if sub.private:
            return b"".join(wire(text) for text in self.frames(sub))
        key = (sub.batch, *sub.cursors.items())
        hit = cache.get(key)
        if hit is None:
            before = sub.skipped_total
            data = b"".join(wire(text) for text in self.frames(sub))
            cache[key] = (data, sub.skipped_total - before)
            return data
        data, skipped = hit
        sub.skipped_total += skipped
        for channel in sub.cursors:
            ring = self.rings.get(channel)
            if ring is not None:
                sub.cursors[channel] = ring.next_seq
        return data

    def skipped(self, channel: str, count: int) -> None:
        """Tell the subscribers of `channel` that `count` of its messages were lost
        before they reached the rings."""
        for sub in self.subscribers:
            if channel in sub.cursors:
                sub.skipped_total += count
                sub.reply({"type": "skipped", "channel": channel, "count": count})

    def close_missing_channels(self) -> None:
        """Tell subscribers of channels that went away, and forget those subscriptions."""
        for channel in [c for c in self.rings if not self.channel_exists(c)]:
            del self.rings[channel]
        for sub in list(self.subscribers):
            for channel in [c for c in sub.cursors if not self.channel_exists(c)]:
                del sub.cursors[channel]
                sub.reply(
                    {
                        "type": "unsubscribed",
                        "channels": [channel],
                        "reason": "channel closed: its plugin went away",
                    }
                )
        self.wake()

    def handle(self, sub: Subscriber, text: str | None) -> list[Followup]:
        """Act on one client frame (`None`: a binary frame); returns what the bot must
        do for it."""
        if text is None:
            sub.reply({"type": "error", "message": "frames must be text (JSON)"})
            return []
        try:
            frame = loads(text)
        except ValueError:
            sub.reply({"type": "error", "message": "frame is not valid JSON"})
            return []
        if not isinstance(frame, dict):
            sub.reply({"type": "error", "message": "frame must be a JSON object"})
            return []
        action = frame.get("action")
        if action == "ping":
            sub.reply({"type": "pong"})
        elif action in ("subscribe", "unsubscribe"):
            return self._subscription(sub, action, frame)
        elif action == "message":
            channel = frame.get("channel")
            if not isinstance(channel, str):
                sub.reply({"type": "error", "message": "'channel' must be a channel name"})
                return []
            return [("message", channel, frame.get("data"))]
        elif action == "auth":
            sub.reply({"type": "authenticated"})
        else:
            sub.reply({"type": "error", "message": f"unknown action {action!r}"})
        return []

    def _subscription(
        self, sub: Subscriber, action: str, frame: Mapping[str, Any]
    ) -> list[Followup]:
        channels = frame.get("channels")
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            sub.reply({"type": "error", "message": "'channels' must be a list of names"})
            return []
        if action == "unsubscribe":
            for channel in channels:
                sub.cursors.pop(channel, None)
            sub.reply({"type": "unsubscribed", "channels": channels})
            return []
        unknown = [c for c in channels if not self.channel_exists(c)]
        if unknown:
            sub.reply({"type": "error", "message": f"unknown channel {unknown[0]!r}"})
            return []
        batch = frame.get("batch", sub.batch)
        if not isinstance(batch, bool):
            sub.reply({"type": "error", "message": "'batch' must be true or false"})
            return []
        sub.batch = batch
        for channel in channels:
            if channel not in sub.cursors:  # from now on
                ring = self.rings.get(channel)
                sub.cursors[channel] = ring.next_seq if ring is not None else 0
        reply: dict[str, Any] = {"type": "subscribed", "channels": sorted(sub.cursors)}
        if batch:
            reply["batch"] = True
        sub.reply(reply)
        return [("greet", c, None) for c in channels if c not in BUILTIN_CHANNELS]

    def stats(self) -> dict[str, Any]:
        """Counters for the benchmarks and the tests."""
        return {
            "published": self.published,
            "subscribers": len(self.subscribers),
            "skipped": [s.skipped_total for s in self.subscribers],
            "sent": [s.sent for s in self.subscribers],
            # How far each subscriber is behind, in messages, on its furthest channel.
            "behind": [
                max(
                    (self.rings[c].next_seq - n for c, n in s.cursors.items() if c in self.rings),
                    default=0,
                )
                for s in self.subscribers
            ],
            "private": [len(s.private) for s in self.subscribers],
            "dropped": sum(1 for s in self.subscribers if s.dropped),
            "ring_sizes": {c: len(r.items) for c, r in self.rings.items()},
        }


# -- the relay process -----------------------------------------------------------------
#
# Everything below runs in the relay process only.

#: Bytes queued for a connection before its transport counts as paused (peer too slow).
WRITE_BUFFER_HIGH = 256 << 10
#: How long a closing connection waits for the peer's close frame.
CLOSE_TIMEOUT = 1.0


def text_frame(text: str) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455 5.2), as a server sends it: the
    same bytes for every peer, so a batch is framed once for all its subscribers."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


class Conn(asyncio.Protocol):
    """One adopted `/ws` connection in the relay process."""

    def __init__(self, relay: Relay, conn_id: int, request: bytes, authed: bool) -> None:
        from websockets.server import ServerProtocol

        self.relay = relay
        self.id = conn_id
        self.request = request
        self.authed = authed
        self.proto = ServerProtocol(max_size=MAX_CLIENT_MESSAGE)
        self.transport: asyncio.Transport | None = None
        self.sub: Subscriber | None = None
        self.closing = False
        self.paused = False
        self._fragments: list[bytes] = []
        self._fragment_text = False
        #: Waiting for the bot: to check the token, or to run an action's follow-ups.
        #: Frames wait meanwhile, in order, as in-process where the next frame is read
        #: once the last one was handled.
        self._waiting = False
        self._held: deque[str | None] = deque()
        #: The authentication deadline, then the closing one.
        self._timer: asyncio.TimerHandle | None = None
        #: Set while writing is paused: the peer has this long to read again.
        self._stall: asyncio.TimerHandle | None = None
        self._close_on_start: tuple[int, str] | None = None
        self._pong_due = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from websockets.http11 import Request

        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.proto.receive_data(self.request)
        events = self.proto.events_received()
        if len(events) != 1 or not isinstance(events[0], Request):
            transport.abort()
            return
        response = self.proto.accept(events[0])
        self.proto.send_response(response)
        self._flush_proto()
        if response.status_code != 101:
            transport.close()
            return
        if self._close_on_start is not None:
            self.close(*self._close_on_start)
        elif self.authed:
            self._join()
        else:
            self._timer = self.relay.loop.call_later(
                self.relay.auth_grace, self.close, 4401, "authentication required"
            )

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode

        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.CLOSE:  # the protocol object answers it
                self.closing = True
                continue
            if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                self._fragments = [bytes(event.data)]
                self._fragment_text = event.opcode is Opcode.TEXT
            elif event.opcode is Opcode.CONT:
                self._fragments.append(bytes(event.data))
            else:  # ping (the protocol object answers it), pong
                if event.opcode is Opcode.PONG:
                    self._pong_due = False
                continue
            if not event.fin:
                continue
            payload = b"".join(self._fragments)
            self._fragments = []
            if not self._fragment_text:
                self._frame(None)
                continue
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                self.close(1007, "invalid UTF-8")
                continue
            self._frame(text)
        self._flush_proto()
        if self.proto.close_expected():  # closing handshake done, or a protocol error
            self._finish()

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.paused = True
        self._update_reading()
        self._stall = self.relay.loop.call_later(self.relay.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._update_reading()
        self.relay.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._leave()
        self.relay.forget(self)

    # the connection's life

    def _join(self) -> None:
        self.sub = Subscriber(self.relay.wake)
        self.sub.on_drop = lambda: self.close(1008, "subscriber too slow")
        self.relay.fanout.subscribers.add(self.sub)

    def _leave(self) -> None:
        if self.sub is not None:
            self.relay.fanout.subscribers.discard(self.sub)

    def authenticated(self, ok: bool) -> None:
        """The bot checked the token of this connection's `auth` frame."""
        if self.closing or self.sub is not None:
            return
        if not ok:
            self.close(4401, "authentication required")
            return
        self._cancel_timer()
        self._join()
        assert self.sub is not None
        self.sub.reply({"type": "authenticated"})
        self.answered()

    def answered(self) -> None:
        """The bot is done with what this connection waited for: on with its frames."""
        self._waiting = False
        while self._held and not self._waiting and not self.closing:
            self._frame(self._held.popleft())
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the peer unless what it sends would only pile up: while it reads
        nothing (the pongs to its pings), or while the bot works for it (what waits in
        `_held` is at most what one read brought). A closing one is read: its close."""
        if self.transport is None or self.transport.is_closing():
            return
        if (self.paused or self._waiting) and not self.closing:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _wait_for_bot(self, op: Mapping[str, Any]) -> None:
        self._waiting = True
        self._update_reading()
        self.relay.to_bot(op)

    def _frame(self, text: str | None) -> None:
        if self.closing:
            return
        if self._waiting:
            self._held.append(text)
            return
        if self.sub is None:
            self._unauthenticated_frame(text)
            return
        followups = self.relay.fanout.handle(self.sub, text)
        if followups:  # the bot answers each in order, then says `done`
            self._wait_for_bot({"op": "followups", "conn": self.id, "items": followups})

    def _unauthenticated_frame(self, text: str | None) -> None:
        try:
            frame = loads(text) if text is not None else None
        except ValueError:
            frame = None
        token = frame.get("token") if isinstance(frame, dict) else None
        if not (
            isinstance(frame, dict) and frame.get("action") == "auth" and isinstance(token, str)
        ):
            self.close(4401, "authentication required")
            return
        self._wait_for_bot({"op": "auth", "conn": self.id, "token": token})

    def send_wire(self, data: bytes) -> None:
        """Write ready-made frames (`text_frame`), after what the protocol object has
        queued (a pong, say)."""
        assert self.transport is not None
        self._flush_proto()
        self.transport.write(data)
        if self.sub is not None:
            self.sub.sent += 1

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the socket is closed when the peer answers, or
        after `CLOSE_TIMEOUT`."""
        if self.closing:
            return
        if self.transport is None:  # not adopted yet: close once it is
            self._close_on_start = (code, reason)
            return
        self.closing = True
        self._leave()
        try:
            self.proto.send_close(code, reason)
        except Exception:  # the protocol already closed (peer's close, error)
            self._finish()
            return
        self._flush_proto()
        self._update_reading()
        self._cancel_timer()
        self._timer = self.relay.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)

    def _finish(self) -> None:
        """The WebSocket is over: close the socket once its buffer is written, or after
        `CLOSE_TIMEOUT` for a peer that reads nothing."""
        self.closing = True
        self._leave()
        if self.transport is None or self.transport.is_closing():
            return
        self._cancel_timer()
        self._timer = self.relay.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
        self.transport.close()

    def ping(self) -> None:
        """Keepalive: close the connection if it did not answer the last ping."""
        if self.transport is None or self.transport.is_closing() or self.closing:
            return
        if self.paused or self._waiting:  # its pong may be unread: other deadlines hold
            self._pong_due = False
            return
        if self._pong_due:
            self.close(1011, "keepalive ping timeout")
            return
        self._pong_due = True
        self.proto.send_ping(b"")
        self._flush_proto()

    def _stalled(self) -> None:
        self._stall = None
        if self.sub is not None and not self.closing:
            self.sub.drop()  # closes it (1008)
        elif self.transport is not None:  # not even the closing handshake gets through
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush_proto(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = self.proto.data_to_send()
        if data:
            self.transport.write(b"".join(data))


class Relay:
    """The relay process: connections handed over by the bot, and the bot's messages."""

    def __init__(self, control: socket.socket, opts: argparse.Namespace) -> None:
        self.loop = asyncio.get_running_loop()
        self.control = control
        self.send_timeout: float = opts.send_timeout
        self.auth_grace: float = opts.auth_grace
        self.batch_interval: float = opts.batch_interval
        self.ping_interval: float = opts.ping_interval
        self.plugin_channels: set[str] = set()
        self.fanout = Fanout(self._channel_exists, self.wake)
        self.conns: dict[int, Conn] = {}
        self.done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbox = bytearray()
        self._fds: deque[int] = deque()
        self._outbox = bytearray()
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = 0.0
        self._shutting_down = False

    def _channel_exists(self, name: str) -> bool:
        return name in BUILTIN_CHANNELS or name in self.plugin_channels

    # from the bot

    def on_control(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, 1 << 18, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self._fds.extend(fds)
        if not data:  # the bot is gone
            self.loop.remove_reader(self.control.fileno())
            self.shutdown(1012, "server restarting; reconnect")
            return
        self._inbox += data
        end = self._inbox.rfind(b"\n")
        if end < 0:
            return
        lines = bytes(self._inbox[:end]).split(b"\n")
        del self._inbox[: end + 1]
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        kind, _, rest = line.partition(b"\t")
        if kind == b"m":
            channel, _, text = rest.partition(b"\t")
            self.fanout.append(channel.decode(), text.decode())
            return
        op = json.loads(rest)
        name = op.get("op")
        if name == "adopt":
            # Known from now on: a `close` may follow before the socket is adopted.
            request = str(op["request"]).encode("latin-1")
            adopted = Conn(self, int(op["conn"]), request, bool(op["authed"]))
            self.conns[adopted.id] = adopted
            task = self.loop.create_task(self._adopt(adopted, self._fds.popleft()))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)
        elif name == "close":
            conn = self.conns.get(op["conn"])
            if conn is not None:
                conn.close(op["code"], op["reason"])
        elif name == "reply":
            conn = self.conns.get(op["conn"])
            if conn is not None and conn.sub is not None:
                conn.sub.reply_text(op["text"])
        elif name == "done":
            conn = self.conns.get(op["conn"])
            if conn is not None:
                conn.answered()
        elif name == "auth_result":
            conn = self.conns.get(op["conn"])
            if conn is not None:
                conn.authenticated(bool(op["ok"]))
        elif name == "channels":
            self.plugin_channels = set(op["names"])
            self.fanout.close_missing_channels()
        elif name == "publish":  # a channel name that a line cannot carry
            self.fanout.append(op["channel"], op["text"])
        elif name == "skipped":  # the bot dropped these while this process lagged
            for channel, count in op["counts"].items():
                self.fanout.skipped(channel, int(count))
        elif name == "stats":
            self.to_bot({"op": "stats", "id": op["id"], "stats": self.fanout.stats()})
        elif name == "shutdown":
            self.shutdown(op.get("code", 1012), op.get("reason", "server restarting; reconnect"))

    async def _adopt(self, conn: Conn, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            self.forget(conn)
            return
        try:
            sock.setblocking(False)
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except OSError:
            sock.close()
            self.forget(conn)

    def keepalive(self) -> None:
        """Ping every connection, every `ping_interval`."""
        self.loop.call_later(self.ping_interval, self.keepalive)
        for conn in list(self.conns.values()):
            conn.ping()

    def forget(self, conn: Conn) -> None:
        """A connection ended: the bot stops watching its token."""
        if self.conns.pop(conn.id, None) is not None:
            self.to_bot({"op": "gone", "conn": conn.id})
        if self._shutting_down and not self.conns:
            self.done.set()

    # to the bot

    def to_bot(self, op: Mapping[str, Any]) -> None:
        self._outbox += b"c\t" + encode(op).encode() + b"\n"
        self._send_outbox()

    def _send_outbox(self) -> None:
        try:
            sent = self.control.send(self._outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._outbox.clear()
            return
        del self._outbox[:sent]
        if self._outbox:
            self.loop.add_writer(self.control.fileno(), self._drain_outbox)

    def _drain_outbox(self) -> None:
        self.loop.remove_writer(self.control.fileno())
        self._send_outbox()

    # to the subscribers

    def wake(self) -> None:
        """Send what is new, at most every `batch_interval`."""
        if self._flush_handle is None:
            delay = self._last_flush + self.batch_interval - self.loop.time()
            self._flush_handle = self.loop.call_later(max(0.0, delay), self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._last_flush = self.loop.time()
        cache: dict[tuple[Any, ...], tuple[bytes, int]] = {}
        for conn in list(self.conns.values()):
            sub = conn.sub
            if sub is None or conn.closing or conn.paused or conn.transport is None:
                continue
            data = self.fanout.frames_shared(sub, cache, text_frame)
            if data:
                conn.send_wire(data)

    def shutdown(self, code: int, reason: str) -> None:
        """Close every connection, then end the process."""
        self._shutting_down = True
        for conn in list(self.conns.values()):
            conn.close(code, reason)
        if not self.conns:
            self.done.set()
        self.loop.call_later(CLOSE_TIMEOUT + 0.5, self.done.set)


async def _relay_main(opts: argparse.Namespace) -> None:
    control = socket.socket(fileno=opts.control)
    control.setblocking(False)
    relay = Relay(control, opts)
    relay.loop.add_reader(control.fileno(), relay.on_control)
    relay.loop.call_later(relay.ping_interval, relay.keepalive)
    relay.to_bot({"op": "ready", "pid": os.getpid()})
    await relay.done.wait()
    for conn in list(relay.conns.values()):
        if conn.transport is not None:
            conn.transport.abort()
    control.close()


def main(argv: list[str] | None = None) -> None:
    """The relay process: `python -I fanout.py --control FD [...]`."""
    parser = argparse.ArgumentParser(description="NekoBot /ws relay process")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--send-timeout", type=float, default=SEND_TIMEOUT)
    parser.add_argument("--auth-grace", type=float, default=AUTH_GRACE_SECONDS)
    parser.add_argument("--batch-interval", type=float, default=BATCH_INTERVAL)
    parser.add_argument("--ping-interval", type=float, default=PING_INTERVAL)
    parser.add_argument("--ring-size", type=int, default=RING_SIZE)
    parser.add_argument("--private-limit", type=int, default=PRIVATE_LIMIT)
    opts = parser.parse_args(argv)
    globals().update(RING_SIZE=opts.ring_size, PRIVATE_LIMIT=opts.private_limit)
    # The bot's terminal sends ^C to the relay too: the bot closes it in order.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay_main(opts))


if __name__ == "__main__":
    main()
