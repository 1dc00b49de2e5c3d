"""Test helpers for plugin authors: a mock platform and pytest fixtures.

    async def test_echo(bot):
        await bot.receive("/echo hi")
        assert bot.replies == ["hi"]

The fixtures come with NekoBot's pytest plugin (registered as `nekobot`): `nekobot_kernel`
is a running Kernel with a temporary data directory, and `bot` a MockBot on it. Mark a
test with `@pytest.mark.nekobot(plugin_dirs=[...], builtin_plugins=[...])` to choose its
plugins.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from kernel.adapter import AdapterStats, Capabilities, SendResult
from kernel.config import KernelConfig
from kernel.kernel import Kernel
from kernel.logs import LogRecord
from kernel.models import (
    ChatType,
    KernelEvent,
    MessageEvent,
    Reply,
    Segment,
    Sender,
    Target,
    Text,
)

T = TypeVar("T")

#: How long a test waits for what another task, thread or process does before it fails.
#: Generous: a loaded machine is slow, and a correct run waits a fraction of it. Never a
#: reason to sleep: wait on an event (`Collected.wait_for`) or a condition (`wait_until`).
PATIENCE = 30.0


class MockBot:
    """A mock platform instance attached to a running kernel; it records what is sent.

    It sends every segment as it is; give it narrower `capabilities` to see what the
    kernel makes of a reply on a platform that cannot send images, say."""

    platform = "mock"

    def __init__(
        self,
        kernel: Kernel,
        *,
        instance: str = "mock",
        chat_type: ChatType = "private",
        chat_id: str = "chat-1",
        sender: Sender | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        self.kernel = kernel
        self.capabilities = capabilities or Capabilities.everything()
        self.instance = instance
        self.chat_type: ChatType = chat_type
        self.chat_id = chat_id
        self.sender = sender or Sender("user-1", "Tester")
        self.sent: list[tuple[Target, Reply]] = []
        self._seq = 0
        self.detach = kernel.pipeline.attach(instance, self)

    @property
    def replies(self) -> list[str]:
        """The plain text of every reply sent so far."""
        return [reply.plain_text for _, reply in self.sent]

    @property
    def stats(self) -> AdapterStats:
        """Adapter side: always running; `sent` counts the replies recorded."""
        return AdapterStats("running", sent=len(self.sent))

    async def start(self) -> None:
        """Adapter side: nothing to connect."""

    async def stop(self) -> None:
        """Adapter side: nothing to disconnect."""

    async def send(self, target: Target, reply: Reply) -> SendResult:
        """Adapter side: record a reply; its message id is its position in `sent`."""
        self.sent.append((target, reply))
        return SendResult((str(len(self.sent)),))

    def event(
        self,
        text: str,
        *,
        chat_type: ChatType | None = None,
        chat_id: str | None = None,
        sender: Sender | None = None,
        segments: Sequence[Segment] | None = None,
    ) -> MessageEvent:
        """A message event as this platform would produce it."""
        self._seq += 1
        return MessageEvent(
            platform=self.platform,
            instance=self.instance,
            chat_type=chat_type or self.chat_type,
            chat_id=chat_id or self.chat_id,
            sender=sender or self.sender,
            segments=tuple(segments) if segments is not None else (Text(text),),
            id=str(self._seq),
        )

    async def receive(self, text: str, **kwargs: Any) -> list[str]:
        """Deliver `text` to the bot, wait until it is handled; return the new replies."""
        before = len(self.sent)
        await self.kernel.dispatch(self.event(text, **kwargs), self)
        return [reply.plain_text for _, reply in self.sent[before:]]

    def clear(self) -> None:
        """Forget the replies recorded so far."""
        self.sent.clear()


@asynccontextmanager
async def running_kernel(
    data_dir: Path,
    *,
    plugin_dirs: Sequence[Path] = (),
    builtin_plugins: Sequence[str] | None = (),
    **options: Any,
) -> AsyncIterator[Kernel]:
    """A kernel for tests: no entry points, no hot reload and no watchdog unless asked;
    besides the loopback names it serves `testserver`, the host of Starlette's
    `TestClient`."""
    options.setdefault("allowed_hosts", ("testserver",))
    options.setdefault("entry_points", False)
    options.setdefault("hot_reload", False)
    options.setdefault("watchdog", False)
    config = KernelConfig(
        data_dir=data_dir,
        plugin_dirs=tuple(plugin_dirs),
        builtin_plugins=None if builtin_plugins is None else tuple(builtin_plugins),
        **options,
    )
    async with Kernel(config) as kernel:
        yield kernel


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(
    app: Any, *, handoff: bool = True, config: KernelConfig | None = None, **overrides: Any
) -> AsyncIterator[int]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port (the settings of `nekobot run`,
    quiet, no lifespan) until the block ends; yields the port. `handoff=False` serves
    WebSockets with uvicorn's own protocol (the `/ws` hub then serves in-process).
    `config` gives the serving limits (default: those of the app's kernel, see
    `kernel.server.uvicorn_config`); `overrides` are set on the uvicorn `Config`."""
    import uvicorn

    from kernel.server import uvicorn_config

    port = free_port()
    served = uvicorn_config(
        app, "127.0.0.1", port, log_level="warning", lifespan="off", config=config
    )
    if not handoff:
        served.ws = "websockets-sansio"
    for key, value in overrides.items():
        setattr(served, key, value)
    server = uvicorn.Server(served)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await wait_until(lambda: server.started)  # uvicorn offers no event
        try:
            yield port
        finally:
            server.should_exit = True


class AsPrincipal:
    """Wrap an ASGI app so every request counts as authenticated (for testing private
    plugin routes without the auth plugin)::

        transport = httpx.ASGITransport(app=AsPrincipal(kernel.asgi_app))
    """

    def __init__(self, app: Any, principal: Any = None) -> None:
        self.app = app
        self.principal = principal if principal is not None else {"username": "tester"}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "nekobot.principal": self.principal}
        await self.app(scope, receive, send)


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, interval: float = 0.01
) -> None:
    """Poll `condition` (a function, or a coroutine function) until it holds;
    TimeoutError after `PATIENCE` seconds.

    Only for what offers nothing to wait on (another process, a thread's file, a flag
    of a library): where an event can be observed, wait on it (`Collected`)."""
    with anyio.fail_after(PATIENCE):
        while True:
            outcome = condition()
            if inspect.isawaitable(outcome):
                outcome = await outcome
            if outcome:
                return
            await anyio.sleep(interval)


class Collected(Generic[T]):
    """Items handed over by a callback (from the loop or from any thread), and a way to
    wait for one: `events = record_events(kernel)`, act, then
    `await events.wait_for(lambda e: e.type == "plugin.reloaded")`."""

    def __init__(self, items: Sequence[T] = ()) -> None:
        self.items: list[T] = list(items)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._changed = anyio.Event()

    def __call__(self, item: T) -> None:
        """Add one item (the callback to subscribe with)."""
        if threading.get_ident() == self._loop_thread:
            self._add(item)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._add, item)

    def _add(self, item: T) -> None:
        self.items.append(item)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[T], bool]) -> T:
        """The first item, collected so far or later, for which `predicate` holds;
        TimeoutError after `PATIENCE` seconds."""
        seen = 0
        with anyio.fail_after(PATIENCE):
            while True:
                changed = self._changed
                for item in self.items[seen:]:
                    if predicate(item):
                        return item
                seen = len(self.items)
                await changed.wait()


def record_events(kernel: Kernel) -> Collected[KernelEvent]:
    """Every kernel event from now on, while the kernel runs."""
    events: Collected[KernelEvent] = Collected()
    kernel.subscribe_events(events)
    return events


def record_logs(kernel: Kernel) -> Collected[LogRecord]:
    """The kernel's log records: those it keeps now, and every one logged from now on
    (by any thread) while it runs."""
    records: Collected[LogRecord] = Collected()
    buffer = kernel.logging.buffer
    # Subscribed first, then the kept ones read: a record logged in between is in both
    # (a duplicate does no harm to a wait), none is missed.
    buffer.subscribe(records)
    kept = list(buffer.records)
    records.items[:0] = kept
    return records
