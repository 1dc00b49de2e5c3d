"""The bot's end of the `/ws` relay process.

The hub starts the relay (the script in `fanout.py`) the first time a connection can be
handed off, and talks to it over one Unix stream socket. Everything a subscriber is sent
is written by the relay; the bot only

* forwards each published message once (lines are gathered for a few milliseconds and
  written in one `send`),
* hands over each accepted connection's socket with its upgrade request,
* answers what needs the kernel: the token of a first `auth` frame, a plugin channel's
  greeting and message handler,
* watches tokens, and tells the relay to close a connection whose token expired, was
  revoked or was voided by a password change, and
* tells it which plugin channels exist, so subscribers of one that goes away hear of it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import anyio

from builtin_plugins.api import fanout
from builtin_plugins.api.fanout import Followup, encode
from kernel import Kernel

log = logging.getLogger("nekobot.api.relay")

#: Published bytes the bot queues for a relay that does not keep up, before it drops.
MAX_BACKLOG = 32 << 20
#: Published lines are gathered this long before they are written to the relay.
GATHER_SECONDS = 0.005
#: How long the relay may take to start, and to stop.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0

StartTask = Callable[..., Any]


class RelayHost(Protocol):
    """What a relay link needs of the hub that starts it (the hub imports this module;
    this module names the hub only through this protocol, so neither imports the other
    in a cycle)."""

    @property
    def kernel(self) -> Kernel:
        """The kernel whose channels the relay serves."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bot's event loop."""

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid token, or None."""

    def token_valid(self, claims: Mapping[str, Any]) -> bool:
        """Whether a connection's token still holds."""

    async def followup(self, kind: str, channel: str, data: Any) -> dict[str, Any] | None:
        """Run one follow-up of a client action: the reply, if any."""


class RelayLink:
    """One relay process, and the connections the bot handed to it."""

    def __init__(self, hub: RelayHost) -> None:
        self.hub = hub
        self.alive = False
        #: The relay's process id, once it is ready.
        self.pid: int | None = None
        #: Every connection handed over and not yet gone.
        self.conns: set[int] = set()
        #: The token claims of those whose token is checked, by connection.
        self.claims: dict[int, Mapping[str, Any]] = {}
        #: Published messages not forwarded because the relay fell too far behind.
        self.dropped = 0
        #: Those not told to the relay's subscribers yet, by channel.
        self._skipped: dict[str, int] = {}
        self._loop = hub.loop
        self._sock: socket.socket | None = None
        self._process: anyio.abc.Process | None = None
        self._next_id = 0
        self._lines: list[bytes] = []
        self._gather: Any = None
        self._queue: deque[list[Any]] = deque()  # [memoryview, fds]
        self._queued = 0
        self._writing = False
        self._reading = False  # `run` waits on the socket
        self._ready = anyio.Event()
        #: Set once the link is broken (the relay stopped, died or could not be reached):
        #: from then on the hub serves no connection through it.
        self.ended = anyio.Event()
        self._conns_changed = anyio.Event()
        self._stats: dict[int, list[Any]] = {}
        self._next_stats = 0

    # -- life ----------------------------------------------------------------------------

    async def start(self, start_task: StartTask) -> None:
        """Start the relay process and wait until it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            command = [
                sys.executable,
                "-I",  # the standard library and site-packages only, nothing from cwd
                str(Path(fanout.__file__)),
                "--control",
                str(theirs.fileno()),
                f"--send-timeout={fanout.SEND_TIMEOUT}",
                f"--auth-grace={fanout.AUTH_GRACE_SECONDS}",
                f"--batch-interval={fanout.BATCH_INTERVAL}",
                f"--ping-interval={fanout.PING_INTERVAL}",
                f"--ring-size={fanout.RING_SIZE}",
                f"--private-limit={fanout.PRIVATE_LIMIT}",
            ]
            self._process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(theirs.fileno(),),
                # ^C at the terminal is for the bot, which then stops the relay in order.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.alive = True
        try:
            start_task(self.run, name="ws relay")  # refused once the plugin is disposed
            with anyio.fail_after(START_TIMEOUT):
                await self._ready.wait()
            if not self.alive:
                raise RuntimeError("the /ws relay process ended before it was ready")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close every connection (1012: reconnect) and end the process."""
        process, self._process = self._process, None
        if process is None:
            return
        self.control({"op": "shutdown", "code": 1012, "reason": "server restarting; reconnect"})
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        self._broken()

    def _broken(self) -> None:
        self.alive = False
        self.ended.set()
        self.conns.clear()
        self.claims.clear()
        for item in self._queue:
            for fd in item[1]:
                os.close(fd)
        self._queue.clear()
        self._queued = 0
        if self._sock is not None:
            if self._writing:
                self._loop.remove_writer(self._sock.fileno())
                self._writing = False
            # Closed only once `run` no longer waits on it (a descriptor closed under a
            # waiter leaves it waiting forever, or on whatever reuses the number); the
            # shutdown wakes it.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if not self._reading:
                self._sock.close()
                self._sock = None
        for waiter in self._stats.values():
            waiter[0].set()
        self._ready.set()  # `start` need not wait any longer

    async def run(self) -> None:
        """Read what the relay sends; watch the tokens of its connections."""
        self._reading = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_tokens)
                async for op in self._ops():
                    self._op(op, tg)
                tg.cancel_scope.cancel()
        except Exception:  # a bug on either side: this relay goes, the next one starts
            log.exception("the /ws relay link failed")
        finally:
            self._reading = False
            if not self.alive:  # `_broken` left the socket to us
                self._broken()
        # The relay closed its end: stopped by us, or it died.
        process, self._process = self._process, None
        self._broken()
        if process is not None:
            log.warning("the /ws relay process ended; it restarts on the next connection")
            with anyio.move_on_after(STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    def _op(self, op: Mapping[str, Any], tg: anyio.abc.TaskGroup) -> None:
        name = op.get("op")
        if name == "ready":
            self.pid = int(op["pid"])
            self._ready.set()
            self.channels()
        elif name == "gone":
            self.conns.discard(op["conn"])
            self.claims.pop(op["conn"], None)
        elif name == "auth":
            self._auth(op["conn"], op["token"])
        elif name == "followups":
            tg.start_soon(self._followups, op["conn"], op["items"])
        elif name == "stats":
            waiter = self._stats.pop(op["id"], None)
            if waiter is not None:
                waiter[1] = op["stats"]
                waiter[0].set()

    async def _ops(self) -> AsyncIterator[dict[str, Any]]:
        buffer = bytearray()
        while self._sock is not None:
            await anyio.wait_readable(self._sock)
            if self._sock is None:
                return
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            end = buffer.rfind(b"\n")
            if end < 0:
                continue
            lines = bytes(buffer[:end]).split(b"\n")
            del buffer[: end + 1]
            for line in lines:
                yield json.loads(line.partition(b"\t")[2])

    # -- connections ---------------------------------------------------------------------

    def adopt(
        self, fd: int, request: bytes, authenticated: bool, claims: Mapping[str, Any] | None
    ) -> None:
        """Hand an accepted connection over: this takes `fd`, unless it raises (as the
        hand-off's `take` must). `authenticated`: its upgrade request carried a valid
        token; else it must send an `auth` frame."""
        if not self.alive:
            raise RuntimeError("the /ws relay is not running")
        self._next_id += 1
        conn = self._next_id
        self.conns.add(conn)
        if claims is not None:
            self._watch(conn, claims)
        op = {"op": "adopt", "conn": conn, "authed": authenticated}
        op["request"] = request.decode("latin-1")
        self.control(op, fds=[fd])

    def close(self, conn: int, code: int, reason: str) -> None:
        """Close one connection."""
        self.claims.pop(conn, None)
        self.control({"op": "close", "conn": conn, "code": code, "reason": reason})

    def channels(self) -> None:
        """Tell the relay which plugin channels exist now."""
        names = sorted(entry.item.name for entry in self.hub.kernel.channels)
        self.control({"op": "channels", "names": names})

    async def stats(self) -> dict[str, Any]:
        """The relay's counters (`Fanout.stats`), plus what the bot dropped."""
        self._next_stats += 1
        ident = self._next_stats
        waiter: list[Any] = [anyio.Event(), None]
        self._stats[ident] = waiter
        self.control({"op": "stats", "id": ident})
        try:
            with anyio.fail_after(5):
                await waiter[0].wait()
        finally:
            self._stats.pop(ident, None)
        stats: dict[str, Any] = dict(waiter[1] or {})
        stats["dropped_by_bot"] = self.dropped
        stats["pid"] = self.pid
        return stats

    def _auth(self, conn: int, token: str) -> None:
        claims = self.hub.verify(token)
        if claims is not None and conn in self.conns:
            self._watch(conn, claims)
        self.control({"op": "auth_result", "conn": conn, "ok": claims is not None})

    async def _followups(self, conn: int, items: list[Followup]) -> None:
        """Run what a client action asks of the kernel, in order, as the in-process hub
        does; then let the connection go on."""
        try:
            for kind, channel, data in items:
                message = await self.hub.followup(kind, channel, data)
                if message is not None and conn in self.conns:
                    self.control({"op": "reply", "conn": conn, "text": encode(message)})
        finally:
            self.control({"op": "done", "conn": conn})

    def _watch(self, conn: int, claims: Mapping[str, Any]) -> None:
        self.claims[conn] = claims
        self._conns_changed.set()

    async def _watch_tokens(self) -> None:
        """Close connections whose token no longer holds (`Hub.token_valid`)."""
        while True:
            now = time.time()
            soonest = min((float(c.get("exp", 0)) for c in self.claims.values()), default=now)
            delay = max(0.0, min(fanout.TOKEN_CHECK_SECONDS, soonest - now))
            if not self.claims:
                delay = fanout.TOKEN_CHECK_SECONDS
            self._conns_changed = anyio.Event()
            with anyio.move_on_after(delay):
                await self._conns_changed.wait()
                continue
            for conn, claims in list(self.claims.items()):
                if not self.hub.token_valid(claims):
                    self.close(conn, 4401, "token expired or revoked")

    # -- writing -------------------------------------------------------------------------

    def publish(self, channel: str, payload: bytes) -> None:
        """Forward one encoded message (UTF-8 JSON; loop thread; never blocks)."""
        if not self.alive:
            return
        if self._queued > MAX_BACKLOG:
            self.dropped += 1
            self._skipped[channel] = self._skipped.get(channel, 0) + 1
            return
        if self._skipped:  # subscribers hear what they missed, where they missed it
            notice = {"op": "skipped", "counts": self._skipped}
            self._lines.append(b"c\t" + encode(notice).encode() + b"\n")
            self._skipped = {}
        if "\t" in channel or "\n" in channel:
            op = {"op": "publish", "channel": channel, "text": payload.decode()}
            self._lines.append(b"c\t" + encode(op).encode() + b"\n")
        else:
            self._lines.append(b"m\t" + channel.encode() + b"\t" + payload + b"\n")
        if self._gather is None:
            self._gather = self._loop.call_later(GATHER_SECONDS, self._flush_lines)

    def _flush_lines(self) -> None:
        self._gather = None
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            self._enqueue(data, [])

    def control(self, op: Mapping[str, Any], fds: list[int] | None = None) -> None:
        """Send a control operation now (after the lines gathered so far)."""
        if self._gather is not None:
            self._gather.cancel()
        self._flush_lines()
        self._enqueue(b"c\t" + encode(op).encode() + b"\n", fds or [])

    def _enqueue(self, data: bytes, fds: list[int]) -> None:
        if not self.alive:  # lines gathered before the link broke
            for fd in fds:
                os.close(fd)
            return
        self._queue.append([memoryview(data), fds])
        self._queued += len(data)
        if not self._writing:
            self._drain()

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while self._queue:
            item = self._queue[0]
            view, fds = item
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = sock.sendmsg([view], ancillary)
                else:
                    sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(sock.fileno(), self._drain)
                return
            except OSError:
                self._broken()
                return
            for fd in fds:  # the relay holds them now
                os.close(fd)
            item[1] = []
            self._queued -= sent
            if sent == len(view):
                self._queue.popleft()
            else:
                item[0] = view[sent:]
        if self._writing:
            self._writing = False
            self._loop.remove_writer(sock.fileno())
