"""The `/ws` hub: authenticated WebSocket subscriptions to `logs`, `events` and plugin
channels.

Where the server can hand a connection over (`kernel.server`, what `nekobot run` serves
with), each `/ws` connection is authenticated here and then handed to a relay process
(`relay.py`, `fanout.py`) that writes every frame: the bot's loop only forwards each
published message once. Elsewhere (another ASGI server, an in-process test transport)
the hub serves the connection itself, on the bot's loop, with the same protocol
(`fanout.Fanout`).

Either way publishing costs the same whatever the number of subscribers; a subscriber
that falls more than a ring behind skips (and is told how many it missed); one whose
peer stops reading is dropped after a while; the bot never waits. A client that
subscribes with `"batch": true` gets everything pending in one frame,
`{"type": "batch", "messages": [...]}`, at most every `BATCH_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from builtin_plugins.api import fanout
from builtin_plugins.api.fanout import BUILTIN_CHANNELS, Fanout, Followup, Subscriber, encode
from builtin_plugins.api.relay import RelayLink, StartTask
from builtin_plugins.api.web import loads
from kernel.asgi import PRINCIPAL
from kernel.protocols import AuthService
from kernel.server import WEBSOCKET_HANDOFF

#: After the relay failed to start, connections are served in-process this long before
#: it is tried again.
RELAY_RETRY_SECONDS = 30.0

log = logging.getLogger("nekobot.api.hub")


def _dumps(message: Mapping[str, Any]) -> bytes:
    """A published message as UTF-8 JSON: orjson (an order of magnitude faster than
    `json`, and this runs for every log record while anyone listens), or `encode` for
    what orjson refuses (lone surrogates, integers beyond 64 bits, keys that are not
    strings)."""
    try:
        return orjson.dumps(message, default=str)
    except (orjson.JSONEncodeError, TypeError):
        return encode(message).encode()


class Hub:
    """Fans messages out to subscribers; safe to publish from other threads."""

    def __init__(self, kernel: Any, start_task: StartTask | None = None) -> None:
        self.kernel = kernel
        self.fanout = Fanout(self.channel_exists, self.wake)
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = anyio.Event()
        self._wake_scheduled = False
        self._start_task = start_task
        self._relay: RelayLink | None = None
        self._relay_lock = anyio.Lock()
        self._relay_failed_at = -RELAY_RETRY_SECONDS
        self._closed = False

    @property
    def subscribers(self) -> set[Subscriber]:
        """The connections served in this process."""
        return self.fanout.subscribers

    @property
    def rings(self) -> dict[str, fanout.ChannelRing]:
        """The channel rings of the connections served in this process."""
        return self.fanout.rings

    @property
    def relay(self) -> RelayLink | None:
        """The relay process, if one runs."""
        return self._relay if self._relay is not None and self._relay.alive else None

    def channel_exists(self, name: str) -> bool:
        """True for the builtin channels and those plugins contribute."""
        return name in BUILTIN_CHANNELS or self.kernel.channels.get(name) is not None

    def publish(self, channel: str, data: Any) -> None:
        """Publish `data` on `channel`: O(1) whatever the subscribers; never blocks."""
        relay = self._relay
        if not self.fanout.subscribers and (relay is None or not relay.conns):
            return  # a subscriber only gets what is published after it subscribed
        # Encoded here, in the caller's thread: `data` may change once this returns.
        payload = _dumps({"type": "message", "channel": channel, "data": data})
        if threading.get_ident() == self._loop_thread:
            self._append(channel, payload)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            self.loop.call_soon_threadsafe(self._append, channel, payload)

    def _append(self, channel: str, payload: bytes) -> None:
        if self.fanout.subscribers:
            self.fanout.append(channel, payload.decode())
        relay = self._relay
        if relay is not None and relay.conns:
            relay.publish(channel, payload)

    def wake(self) -> None:
        """Wake the writers once per loop iteration, however much was published in it."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self.loop.call_soon(self._wake_writers)

    def _wake_writers(self) -> None:
        self._wake_scheduled = False
        event, self._wake = self._wake, anyio.Event()
        event.set()

    def close_missing_channels(self) -> None:
        """Tell subscribers of channels that went away, and forget those subscriptions."""
        self.fanout.close_missing_channels()
        if self.relay is not None:
            self.relay.channels()

    async def stats(self) -> dict[str, Any]:
        """Counters: `in_process` for connections served here, `relay` for the others."""
        out: dict[str, Any] = {"in_process": self.fanout.stats(), "relay": None}
        if self.relay is not None:
            out["relay"] = await self.relay.stats()
        return out

    async def aclose(self) -> None:
        """Stop the relay process (its connections are told to reconnect)."""
        self._closed = True  # one starting now is stopped once it is ready
        relay, self._relay = self._relay, None
        if relay is not None:
            await relay.stop()

    async def _relay_link(self) -> RelayLink | None:
        """The running relay, started on first use; None if it cannot run."""
        if self._start_task is None:
            return None
        async with self._relay_lock:
            if self._closed:
                return None
            if self.relay is not None:
                return self.relay
            if time.monotonic() - self._relay_failed_at < RELAY_RETRY_SECONDS:
                return None
            link = RelayLink(self)
            try:
                await link.start(self._start_task)
            except Exception:
                log.exception("the /ws relay process did not start; serving in-process")
                self._relay_failed_at = time.monotonic()
                return None
            if self._closed:  # the plugin went away while it started: nobody would stop it
                await link.stop()
                return None
            self._relay = link
            return link

    async def followup(self, kind: str, channel: str, data: Any) -> dict[str, Any] | None:
        """Run one follow-up of a client action (`Fanout.handle`): the reply, if any."""
        if kind == "greet":
            return await self.greet(channel)
        return await self.channel_message(channel, data)

    async def greet(self, channel: str) -> dict[str, Any] | None:
        """What a plugin channel says to a new subscriber (its `on_subscribe`)."""
        entry = self.kernel.channels.get(channel)
        if entry is None or entry.item.on_subscribe is None:
            return None
        try:
            with anyio.fail_after(self.kernel.config.hook_timeout):
                data = await entry.item.on_subscribe()
        except Exception as exc:
            return {"type": "error", "message": f"channel {channel!r} failed: {exc}"}
        if data is None:
            return None
        return {"type": "message", "channel": channel, "data": data}

    async def channel_message(self, channel: str, data: Any) -> dict[str, Any] | None:
        """A client's message to a plugin channel, and the channel's answer."""
        entry = self.kernel.channels.get(channel)
        if entry is None or entry.item.on_message is None:
            return {"type": "error", "message": f"channel {channel!r} takes no messages"}
        try:
            with anyio.fail_after(self.kernel.config.hook_timeout):
                reply = await entry.item.on_message(data)
        except Exception as exc:
            return {"type": "error", "message": f"channel {channel!r} failed: {exc}"}
        if reply is None:
            return None
        return {"type": "message", "channel": channel, "data": reply}

    async def serve(self, ws: WebSocket) -> None:
        """Run one connection: authenticate, then handle actions until it closes (or hand
        it to the relay process, where the server can)."""
        principal = ws.scope.get(PRINCIPAL)
        claims = principal.get("claims") if isinstance(principal, dict) else None
        handoff = ws.scope.get("extensions", {}).get(WEBSOCKET_HANDOFF)
        if handoff is not None:
            relay = await self._relay_link()
            if relay is not None:
                authenticated = principal is not None

                def take(fd: int, request: bytes) -> None:
                    relay.adopt(fd, request, authenticated, claims)

                try:
                    handoff["handoff"](take)
                    return
                except RuntimeError:  # the relay just ended, or the client left meanwhile
                    pass
        await ws.accept()
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

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid token, as the auth service checks it for HTTP."""
        service = self.kernel.services.current(AuthService)
        claims = service.verify(token) if service is not None else None
        return claims if isinstance(claims, dict) else None

    def token_valid(self, claims: Mapping[str, Any]) -> bool:
        """Whether a connection's token still holds (not expired, revoked or voided by a
        password change): the auth service decides, as for every HTTP request."""
        service = self.kernel.services.current(AuthService)
        if service is not None:
            return bool(service.still_valid(claims))
        return time.time() < float(claims.get("exp", 0))

    async def _first_frame_auth(self, ws: WebSocket) -> dict[str, Any] | None:
        """The claims of the token in a first `auth` frame; else the socket is closed."""
        with anyio.move_on_after(fanout.AUTH_GRACE_SECONDS):
            try:
                frame = loads(await ws.receive_text())
            except (ValueError, KeyError, WebSocketDisconnect):
                frame = None
            if (
                isinstance(frame, dict)
                and frame.get("action") == "auth"
                and isinstance(frame.get("token"), str)
            ):
                claims = self.verify(frame["token"])
                if claims is not None:
                    await ws.send_json({"type": "authenticated"})
                    return claims
        await _close(ws, 4401, "authentication required")
        return None

    async def _watch_token(
        self, claims: Mapping[str, Any], sub: Subscriber, cancel: anyio.CancelScope
    ) -> None:
        """End the connection once its token no longer holds (`token_valid`)."""
        while True:
            expires = float(claims.get("exp", 0))
            await anyio.sleep(max(0.0, min(fanout.TOKEN_CHECK_SECONDS, expires - time.time())))
            if not self.token_valid(claims):
                sub.token_invalid = True
                cancel.cancel()
                return

    async def _writer(self, ws: WebSocket, sub: Subscriber, cancel: anyio.CancelScope) -> None:
        try:
            while not sub.dropped:
                wake = self._wake  # taken before collecting, so no wake-up is missed
                frames = self.fanout.frames(sub)
                if not frames:
                    await wake.wait()
                    continue
                for text in frames:
                    with anyio.move_on_after(fanout.SEND_TIMEOUT) as timer:
                        await ws.send_text(text)
                    if timer.cancelled_caught:
                        sub.drop()  # the peer stopped reading
                        return
                    sub.sent += 1
                if sub.batch:
                    await anyio.sleep(fanout.BATCH_INTERVAL)
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
            await self._run(sub, self.fanout.handle(sub, message.get("text")))

    async def _run(self, sub: Subscriber, followups: list[Followup]) -> None:
        for kind, channel, data in followups:
            answer = await self.followup(kind, channel, data)
            if answer is not None:
                sub.reply(answer)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close if still open; a peer that already left is not an error."""
    if ws.application_state != WebSocketState.CONNECTED:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
        await ws.close(code=code, reason=reason)
