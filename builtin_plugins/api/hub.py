"""The `/ws` hub: authenticated WebSocket subscriptions to `logs`, `events` and plugin
channels.

Publishing costs the same whatever the number of subscribers: a message is encoded once
and appended to its channel's ring; each connection's writer sends what is new since its
cursor. A subscriber that falls more than a ring behind skips (and is told how many it
missed); one whose peer stops reading is dropped after a while. The bot never waits.
A client that subscribes with `"batch": true` gets everything pending in one frame,
`{"type": "batch", "messages": [...]}`, at most every `BATCH_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from builtin_plugins.api.web import loads
from kernel.asgi import PRINCIPAL

SERVICE = "ws.hub"
BUILTIN_CHANNELS = ("logs", "events")
#: Messages a channel keeps for subscribers that are behind.
RING_SIZE = 4096
#: Replies (pong, errors, ...) queued for one connection before it counts as stuck.
PRIVATE_LIMIT = 256
#: A send that has not completed after this long means the peer stopped reading.
SEND_TIMEOUT = 10.0
#: Batch frames are sent at most this often per connection.
BATCH_INTERVAL = 0.025
AUTH_GRACE_SECONDS = 5.0
#: How often an open connection's token is checked for revocation.
TOKEN_CHECK_SECONDS = 5.0


def encode(message: Mapping[str, Any]) -> str:
    """A message as the text of one frame."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)


class ChannelRing:
    """The last `RING_SIZE` encoded messages of one channel, with sequence numbers."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self.items: deque[str] = deque(maxlen=size)
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
        if self.dropped:
            return
        self.private.append(encode(message))
        if len(self.private) > PRIVATE_LIMIT:
            self.drop()
        else:
            self._wake()

    def drop(self) -> None:
        """End the connection (its writer may be stuck in a send to a peer that reads
        nothing: cancelling frees it)."""
        self.dropped = True
        if self.on_drop is not None:
            self.on_drop()


class Hub:
    """Fans messages out to subscribers; safe to publish from other threads."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.subscribers: set[Subscriber] = set()
        self.rings: dict[str, ChannelRing] = {}
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = anyio.Event()
        self._wake_scheduled = False

    def channel_exists(self, name: str) -> bool:
        """True for the builtin channels and those plugins contribute."""
        return name in BUILTIN_CHANNELS or self.kernel.channels.get(name) is not None

    def publish(self, channel: str, data: Any) -> None:
        """Publish `data` on `channel`: O(1) whatever the subscribers; never blocks."""
        if not self.subscribers:
            return  # a subscriber only gets what is published after it subscribed
        # Encoded here, in the caller's thread: `data` may change once this returns.
        text = encode({"type": "message", "channel": channel, "data": data})
        if threading.get_ident() == self._loop_thread:
            self._append(channel, text)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            self._loop.call_soon_threadsafe(self._append, channel, text)

    def _append(self, channel: str, text: str) -> None:
        ring = self.rings.get(channel)
        if ring is None:
            ring = self.rings[channel] = ChannelRing()
        ring.append(text)
        self.wake()

    def wake(self) -> None:
        """Wake the writers once per loop iteration, however much was published in it."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon(self._wake_writers)

    def _wake_writers(self) -> None:
        self._wake_scheduled = False
        event, self._wake = self._wake, anyio.Event()
        event.set()

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

    def _pending(self, sub: Subscriber) -> list[str]:
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

    async def serve(self, ws: WebSocket) -> None:
        """Run one connection: authenticate, then handle actions until it closes."""
        await ws.accept()
        principal = ws.scope.get(PRINCIPAL)
        claims = principal.get("claims") if isinstance(principal, dict) else None
        if principal is None:
            claims = await self._first_frame_auth(ws)
            if claims is None:
                return
        sub = Subscriber(self.wake)
        self.subscribers.add(sub)
        going_away = False
        try:
            async with anyio.create_task_group() as tg:
                sub.on_drop = tg.cancel_scope.cancel
                tg.start_soon(self._writer, ws, sub, tg.cancel_scope)
                if isinstance(claims, dict):
                    tg.start_soon(self._watch_token, claims, sub, tg.cancel_scope)
                await self._reader(ws, sub)
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            going_away = True  # the plugin is being disposed (reload, shutdown)
            raise
        finally:
            self.subscribers.discard(sub)
            if sub.token_invalid:
                await _close(ws, 4401, "token expired or revoked")
            elif sub.dropped:
                await _close(ws, 1008, "subscriber too slow")
            elif going_away:
                await _close(ws, 1012, "server restarting; reconnect")
            else:
                await _close(ws, 1000, "")

    async def _first_frame_auth(self, ws: WebSocket) -> dict[str, Any] | None:
        """The claims of the token in a first `auth` frame; else the socket is closed."""
        service = self.kernel.services.get("auth")
        with anyio.move_on_after(AUTH_GRACE_SECONDS):
            try:
                frame = loads(await ws.receive_text())
            except (ValueError, KeyError, WebSocketDisconnect):
                frame = None
            if (
                isinstance(frame, dict)
                and frame.get("action") == "auth"
                and isinstance(frame.get("token"), str)
                and service is not None
            ):
                claims = service.verify(frame["token"])
                if isinstance(claims, dict):
                    await ws.send_json({"type": "authenticated"})
                    return claims
        await _close(ws, 4401, "authentication required")
        return None

    async def _watch_token(
        self, claims: Mapping[str, Any], sub: Subscriber, cancel: anyio.CancelScope
    ) -> None:
        """End the connection once its token expires, is revoked (logout) or is voided by
        a password change: the auth service decides, as for every HTTP request."""
        while True:
            expires = float(claims.get("exp", 0))
            await anyio.sleep(max(0.0, min(TOKEN_CHECK_SECONDS, expires - time.time())))
            still_valid = getattr(self.kernel.services.get("auth"), "still_valid", None)
            valid = still_valid(claims) if still_valid is not None else time.time() < expires
            if not valid:
                sub.token_invalid = True
                cancel.cancel()
                return

    async def _writer(self, ws: WebSocket, sub: Subscriber, cancel: anyio.CancelScope) -> None:
        try:
            while not sub.dropped:
                wake = self._wake  # taken before collecting, so no wake-up is missed
                frames = self._pending(sub)
                if not frames:
                    await wake.wait()
                    continue
                if sub.batch:
                    frames = ['{"type":"batch","messages":[' + ",".join(frames) + "]}"]
                for text in frames:
                    with anyio.move_on_after(SEND_TIMEOUT) as timer:
                        await ws.send_text(text)
                    if timer.cancelled_caught:
                        sub.drop()  # the peer stopped reading
                        return
                    sub.sent += 1
                if sub.batch:
                    await anyio.sleep(BATCH_INTERVAL)
        except Exception:
            pass
        cancel.cancel()

    async def _reader(self, ws: WebSocket, sub: Subscriber) -> None:
        while True:
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:  # a binary frame: an error, not the end of the connection
                sub.reply({"type": "error", "message": "frames must be text (JSON)"})
                continue
            try:
                frame = loads(text)
            except ValueError:
                sub.reply({"type": "error", "message": "frame is not valid JSON"})
                continue
            if not isinstance(frame, dict):
                sub.reply({"type": "error", "message": "frame must be a JSON object"})
                continue
            await self._action(frame, sub)

    async def _action(self, frame: Mapping[str, Any], sub: Subscriber) -> None:
        action = frame.get("action")
        if action == "ping":
            sub.reply({"type": "pong"})
        elif action in ("subscribe", "unsubscribe"):
            channels = frame.get("channels")
            if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
                sub.reply({"type": "error", "message": "'channels' must be a list of names"})
                return
            if action == "unsubscribe":
                for channel in channels:
                    sub.cursors.pop(channel, None)
                sub.reply({"type": "unsubscribed", "channels": channels})
                self.wake()
                return
            unknown = [c for c in channels if not self.channel_exists(c)]
            if unknown:
                sub.reply({"type": "error", "message": f"unknown channel {unknown[0]!r}"})
                return
            batch = frame.get("batch", sub.batch)
            if not isinstance(batch, bool):
                sub.reply({"type": "error", "message": "'batch' must be true or false"})
                return
            sub.batch = batch
            for channel in channels:
                if channel not in sub.cursors:  # from now on
                    ring = self.rings.get(channel)
                    sub.cursors[channel] = ring.next_seq if ring is not None else 0
            reply: dict[str, Any] = {"type": "subscribed", "channels": sorted(sub.cursors)}
            if batch:
                reply["batch"] = True
            sub.reply(reply)
            for channel in channels:
                await self._greet(channel, sub)
        elif action == "message":
            await self._to_channel(frame, sub)
        elif action == "auth":
            sub.reply({"type": "authenticated"})
        else:
            sub.reply({"type": "error", "message": f"unknown action {action!r}"})

    async def _greet(self, channel: str, sub: Subscriber) -> None:
        entry = self.kernel.channels.get(channel)
        if entry is None or entry.item.on_subscribe is None:
            return
        try:
            with anyio.fail_after(self.kernel.config.hook_timeout):
                data = await entry.item.on_subscribe()
        except Exception as exc:
            sub.reply({"type": "error", "message": f"channel {channel!r} failed: {exc}"})
            return
        if data is not None:
            sub.reply({"type": "message", "channel": channel, "data": data})

    async def _to_channel(self, frame: Mapping[str, Any], sub: Subscriber) -> None:
        channel = frame.get("channel")
        entry = self.kernel.channels.get(channel) if isinstance(channel, str) else None
        if entry is None or entry.item.on_message is None:
            sub.reply({"type": "error", "message": f"channel {channel!r} takes no messages"})
            return
        try:
            with anyio.fail_after(self.kernel.config.hook_timeout):
                reply = await entry.item.on_message(frame.get("data"))
        except Exception as exc:
            sub.reply({"type": "error", "message": f"channel {channel!r} failed: {exc}"})
            return
        if reply is not None:
            sub.reply({"type": "message", "channel": channel, "data": reply})


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close if still open; a peer that already left is not an error."""
    if ws.application_state != WebSocketState.CONNECTED:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
        await ws.close(code=code, reason=reason)
