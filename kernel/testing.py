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

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from kernel.config import KernelConfig
from kernel.kernel import Kernel
from kernel.models import ChatType, MessageEvent, Reply, Segment, Sender, Target


class MockBot:
    """A mock platform instance attached to a running kernel; it records what is sent."""

    platform = "mock"

    def __init__(
        self,
        kernel: Kernel,
        *,
        instance: str = "mock",
        chat_type: ChatType = "private",
        chat_id: str = "chat-1",
        sender: Sender | None = None,
    ) -> None:
        self.kernel = kernel
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

    async def send(self, target: Target, reply: Reply) -> None:
        """Adapter side: record a reply."""
        self.sent.append((target, reply))

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
            segments=tuple(segments) if segments is not None else (Segment.text(text),),
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
    builtin_plugins: Sequence[str] = (),
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
        builtin_plugins=tuple(builtin_plugins),
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
    import anyio
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
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers no event)
                await anyio.sleep(0.01)
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
