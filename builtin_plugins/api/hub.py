"""The `/ws` hub: authenticated WebSocket subscriptions to `logs`, `events` and plugin
channels. Every subscriber has a bounded queue: a slow one skips messages (and is dropped
if it keeps falling behind); it never stalls the bot."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from builtin_plugins.api.web import loads
from kernel.asgi import PRINCIPAL

SERVICE = "ws.hub"
BUILTIN_CHANNELS = ("logs", "events")
QUEUE_SIZE = 256
#: A subscriber that skipped this many messages in a row is disconnected.
MAX_SKIPPED = 2048
AUTH_GRACE_SECONDS = 5.0
#: How often an open connection's token is checked for revocation.
TOKEN_CHECK_SECONDS = 5.0


class Subscriber:
    """One WebSocket connection's subscriptions and outgoing queue."""

    def __init__(self, send: MemoryObjectSendStream[dict[str, Any]]) -> None:
        self.send = send
        self.channels: set[str] = set()
        #: Messages skipped in a row, and in all.
        self.skipped = 0
        self.skipped_total = 0
        self.dropped = False
        #: Set when the connection's token expired or was revoked.
        self.token_invalid = False
        #: Called once when the subscriber is dropped: ends its connection.
        self.on_drop: Callable[[], None] | None = None

    def offer(self, message: dict[str, Any]) -> None:
        """Queue `message` without waiting; a full queue skips it."""
        if self.dropped:
            return
        try:
            self.send.send_nowait(message)
            self.skipped = 0
        except anyio.WouldBlock:
            self.skipped += 1
            self.skipped_total += 1
            if self.skipped >= MAX_SKIPPED:
                self._drop()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._drop()

    def _drop(self) -> None:
        # Its writer may be stuck in a send to a peer that reads nothing: cancel it, so
        # that the connection ends and its queue is freed.
        self.dropped = True
        if self.on_drop is not None:
            self.on_drop()


class Hub:
    """Fans messages out to subscribers; safe to publish from other threads."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.subscribers: set[Subscriber] = set()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.published = 0

    def channel_exists(self, name: str) -> bool:
        """True for the builtin channels and those plugins contribute."""
        return name in BUILTIN_CHANNELS or self.kernel.channels.get(name) is not None

    def publish(self, channel: str, data: Any) -> None:
        """Send `data` to every subscriber of `channel` (never blocks)."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.publish, channel, data)
            return
        self.published += 1
        message = {"type": "message", "channel": channel, "data": data}
        for sub in list(self.subscribers):
            if channel in sub.channels:
                sub.offer(message)

    def close_missing_channels(self) -> None:
        """Tell subscribers of channels that went away, and forget those subscriptions."""
        for sub in list(self.subscribers):
            gone = [c for c in sub.channels if not self.channel_exists(c)]
            for channel in gone:
                sub.channels.discard(channel)
                sub.offer(
                    {
                        "type": "unsubscribed",
                        "channels": [channel],
                        "reason": "channel closed: its plugin went away",
                    }
                )

    async def serve(self, ws: WebSocket) -> None:
        """Run one connection: authenticate, then handle actions until it closes."""
        await ws.accept()
        principal = ws.scope.get(PRINCIPAL)
        claims = principal.get("claims") if isinstance(principal, dict) else None
        if principal is None:
            claims = await self._first_frame_auth(ws)
            if claims is None:
                return
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](QUEUE_SIZE)
        sub = Subscriber(send)
        self.subscribers.add(sub)
        going_away = False
        try:
            async with anyio.create_task_group() as tg:
                sub.on_drop = tg.cancel_scope.cancel
                tg.start_soon(self._writer, ws, receive, sub, tg.cancel_scope)
                if isinstance(claims, dict):
                    tg.start_soon(self._watch_token, claims, sub, tg.cancel_scope)
                await self._reader(ws, sub)
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            going_away = True  # the plugin is being disposed (reload, shutdown)
            raise
        finally:
            self.subscribers.discard(sub)
            send.close()
            receive.close()
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
        """End the connection once its token expires or is revoked (logout)."""
        while True:
            left = float(claims.get("exp", 0)) - time.time()
            await anyio.sleep(max(0.0, min(TOKEN_CHECK_SECONDS, left)))
            service = self.kernel.services.get("auth")
            revoked = getattr(service, "revoked", {})
            if time.time() >= float(claims.get("exp", 0)) or claims.get("jti") in revoked:
                sub.token_invalid = True
                cancel.cancel()
                return

    async def _writer(
        self, ws: WebSocket, receive: Any, sub: Subscriber, cancel: anyio.CancelScope
    ) -> None:
        try:
            async for message in receive:
                if sub.dropped:
                    break
                await ws.send_json(message)
        except Exception:
            pass
        cancel.cancel()
        if sub.dropped:
            await _close(ws, 1008, "subscriber too slow")

    async def _reader(self, ws: WebSocket, sub: Subscriber) -> None:
        while True:
            try:
                text = await ws.receive_text()
            except (WebSocketDisconnect, KeyError, RuntimeError):
                return
            try:
                frame = loads(text)
            except ValueError:
                sub.offer({"type": "error", "message": "frame is not valid JSON"})
                continue
            if not isinstance(frame, dict):
                sub.offer({"type": "error", "message": "frame must be a JSON object"})
                continue
            await self._action(frame, sub)

    async def _action(self, frame: Mapping[str, Any], sub: Subscriber) -> None:
        action = frame.get("action")
        if action == "ping":
            sub.offer({"type": "pong"})
        elif action in ("subscribe", "unsubscribe"):
            channels = frame.get("channels")
            if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
                sub.offer({"type": "error", "message": "'channels' must be a list of names"})
                return
            if action == "unsubscribe":
                sub.channels.difference_update(channels)
                sub.offer({"type": "unsubscribed", "channels": channels})
                return
            unknown = [c for c in channels if not self.channel_exists(c)]
            if unknown:
                sub.offer({"type": "error", "message": f"unknown channel {unknown[0]!r}"})
                return
            sub.channels.update(channels)
            sub.offer({"type": "subscribed", "channels": sorted(sub.channels)})
            for channel in channels:
                await self._greet(channel, sub)
        elif action == "message":
            await self._to_channel(frame, sub)
        elif action == "auth":
            sub.offer({"type": "authenticated"})
        else:
            sub.offer({"type": "error", "message": f"unknown action {action!r}"})

    async def _greet(self, channel: str, sub: Subscriber) -> None:
        entry = self.kernel.channels.get(channel)
        if entry is None or entry.item.on_subscribe is None:
            return
        try:
            with anyio.fail_after(self.kernel.config.hook_timeout):
                data = await entry.item.on_subscribe()
        except Exception as exc:
            sub.offer({"type": "error", "message": f"channel {channel!r} failed: {exc}"})
            return
        if data is not None:
            sub.offer({"type": "message", "channel": channel, "data": data})

    async def _to_channel(self, frame: Mapping[str, Any], sub: Subscriber) -> None:
        channel = frame.get("channel")
        entry = self.kernel.channels.get(channel) if isinstance(channel, str) else None
        if entry is None or entry.item.on_message is None:
            sub.offer({"type": "error", "message": f"channel {channel!r} takes no messages"})
            return
        try:
            with anyio.fail_after(self.kernel.config.hook_timeout):
                reply = await entry.item.on_message(frame.get("data"))
        except Exception as exc:
            sub.offer({"type": "error", "message": f"channel {channel!r} failed: {exc}"})
            return
        if reply is not None:
            sub.offer({"type": "message", "channel": channel, "data": reply})


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close if still open; a peer that already left is not an error."""
    if ws.application_state != WebSocketState.CONNECTED:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
        await ws.close(code=code, reason=reason)
