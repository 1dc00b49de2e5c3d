"""The `/ws` relay process: started on the first connection, stopped with the `api`
plugin, restarted after it dies; the hub serves in-process when it cannot start."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import websockets

from builtin_plugins.api import fanout
from builtin_plugins.api.relay import RelayLink, StartTask
from kernel import DisposedError
from kernel.testing import PATIENCE, wait_until
from tests.builtin_plugins.conftest import ApiServer, api_server

pytestmark = pytest.mark.anyio


async def pong(api: ApiServer) -> None:
    """Open a socket, ping, get the pong."""
    url = api.ws_url()
    async with websockets.connect(url, additional_headers=api.headers) as ws:
        await ws.send(json.dumps({"action": "ping"}))
        with anyio.fail_after(PATIENCE):
            assert json.loads(await ws.recv()) == {"type": "pong"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def ended(pid: int) -> None:
    """Wait until process `pid` is gone (another process: nothing to wait on but it)."""
    await wait_until(lambda: not alive(pid))


async def test_started_on_first_use_and_stopped_with_the_kernel(tmp_path: Path) -> None:
    async with api_server(tmp_path) as api:
        hub = api.hub
        assert hub.relay is None  # nobody connected yet: no process
        await pong(api)
        assert hub.relay is not None and hub.relay.pid is not None
        pid = hub.relay.pid
        assert alive(pid)
        await pong(api)
        assert hub.relay.pid == pid  # one relay for every connection
    await ended(pid)


async def test_a_relay_that_dies_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with api_server(tmp_path) as api:
        hub = api.hub
        await pong(api)
        assert hub.relay is not None and hub.relay.pid is not None
        link, old = hub.relay, hub.relay.pid
        url = api.ws_url()
        async with websockets.connect(url, additional_headers=api.headers) as ws:
            os.kill(old, signal.SIGKILL)
            # Its connections drop (no close frame: the process is gone) ...
            with anyio.fail_after(PATIENCE), pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        with anyio.fail_after(PATIENCE):
            await link.ended.wait()  # the bot notices the end
        assert hub.relay is None
        assert any("relay process ended" in r.getMessage() for r in caplog.records)
        # ... and the next connection starts a new one.
        await pong(api)
        assert hub.relay is not None and hub.relay.pid not in (None, old)


async def test_served_in_process_when_the_relay_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def fail(self: RelayLink, start_task: object) -> None:
        raise OSError("no processes today")

    monkeypatch.setattr(RelayLink, "start", fail)
    caplog.set_level(logging.ERROR)
    async with api_server(tmp_path) as api:
        await pong(api)
        hub = api.hub
        assert hub.relay is None
        assert any("did not start" in r.getMessage() for r in caplog.records)
        # Not retried for every connection.
        caplog.clear()
        await pong(api)
        assert not any("did not start" in r.getMessage() for r in caplog.records)


class _Hub:
    """What a `RelayLink` needs of its hub before it talks to a relay."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()


async def test_a_refused_adoption_leaves_the_descriptor_to_the_caller() -> None:
    link = RelayLink(_Hub())  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = os.dup(theirs.fileno())
        with pytest.raises(RuntimeError):
            link.adopt(fd, b"GET /ws HTTP/1.1\r\n\r\n", True, None)
        os.fstat(fd)  # still open: the hand-off closes it (once)
        os.close(fd)


async def test_a_relay_gone_before_the_handoff_leaves_the_connection_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = RelayLink.start

    async def start_then_die(self: RelayLink, start_task: StartTask) -> None:
        await start(self, start_task)
        await self.stop()

    monkeypatch.setattr(RelayLink, "start", start_then_die)
    async with api_server(tmp_path) as api:
        await pong(api)  # served in-process, not a 500
        assert api.hub.relay is None


def spawned(monkeypatch: pytest.MonkeyPatch) -> list[anyio.abc.Process]:
    """The processes `anyio.open_process` starts from now on."""
    processes: list[anyio.abc.Process] = []
    open_process = anyio.open_process

    async def recording(*args: Any, **kwargs: Any) -> anyio.abc.Process:
        process = await open_process(*args, **kwargs)
        processes.append(process)
        return process

    monkeypatch.setattr(anyio, "open_process", recording)
    return processes


async def test_a_relay_started_while_the_plugin_goes_away_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processes = spawned(monkeypatch)
    start = RelayLink.start

    async def start_during_disposal(self: RelayLink, start_task: StartTask) -> None:
        await start(self, start_task)
        await self.hub.aclose()  # the plugin's disposal, while this one started

    monkeypatch.setattr(RelayLink, "start", start_during_disposal)
    async with api_server(tmp_path) as api:
        await pong(api)
        assert api.hub.relay is None
        (process,) = processes
        assert process.returncode is not None


async def test_a_relay_the_disposed_plugin_cannot_watch_is_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    processes = spawned(monkeypatch)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise DisposedError("plugin 'api' was disposed; cannot start a task")

    link = RelayLink(_Hub())  # type: ignore[arg-type]
    with pytest.raises(DisposedError):
        await link.start(refused)
    (process,) = processes
    assert process.returncode is not None
    assert not link.alive


async def test_a_link_that_breaks_while_the_relay_runs_is_noticed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with api_server(tmp_path) as api:
        hub = api.hub
        await pong(api)
        link = hub.relay
        assert link is not None and link.pid is not None
        # As when a write to the relay fails: the reader must not be left waiting on a
        # closed descriptor (it would never learn that the relay is gone).
        link._broken()
        await ended(link.pid)
        assert any("relay process ended" in r.getMessage() for r in caplog.records)
        await pong(api)  # a new one
        assert hub.relay is not None and hub.relay is not link


async def test_a_relay_that_exits_at_once_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from builtin_plugins.api import relay as relay_module

    monkeypatch.setattr(fanout, "RING_SIZE", "not a number")  # its arguments are refused
    # A start timeout nobody waits out: the pong comes only if its end is noticed.
    monkeypatch.setattr(relay_module, "START_TIMEOUT", 3600.0)
    caplog.set_level(logging.ERROR)
    async with api_server(tmp_path) as api:
        await pong(api)  # in-process, without waiting for the start timeout
        assert any("did not start" in r.getMessage() for r in caplog.records)


async def test_what_the_bot_drops_for_a_lagging_relay_is_told_as_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from builtin_plugins.api import relay as relay_module

    log = logging.getLogger("nekobot.tests.relay")
    async with api_server(tmp_path) as api:
        url = api.ws_url()
        async with websockets.connect(url, additional_headers=api.headers) as ws:
            await ws.send(json.dumps({"action": "subscribe", "channels": ["logs"]}))
            with anyio.fail_after(PATIENCE):
                while json.loads(await ws.recv())["type"] != "subscribed":
                    pass
            # As if the relay had fallen 32 MB behind: everything is dropped meanwhile.
            monkeypatch.setattr(relay_module, "MAX_BACKLOG", -1)
            for i in range(5):
                log.warning("zzrelay dropped %d", i)
            monkeypatch.setattr(relay_module, "MAX_BACKLOG", 1 << 20)
            log.warning("zzrelay after the drops")
            seen = []
            with anyio.fail_after(PATIENCE):
                while True:
                    m = json.loads(await ws.recv())
                    seen.append(m)
                    if m.get("data", {}).get("message") == "zzrelay after the drops":
                        break
            skipped = [m for m in seen if m["type"] == "skipped"]
            assert skipped and skipped[0]["channel"] == "logs" and skipped[0]["count"] >= 5
            assert not any("zzrelay dropped" in m.get("data", {}).get("message", "") for m in seen)
            assert api.hub.relay is not None


TAB_CHANNEL_PLUGIN = """
from kernel import ChannelSpec, CommandSpec, hookimpl

STATE = {}

async def tick(cmd):
    STATE["ctx"].publish("zzrel\\ttab", {"n": cmd.args})
    return "ticked"

@hookimpl
def nekobot_ws_channels():
    return [ChannelSpec("zzrel\\ttab", "a name a line cannot carry")]

@hookimpl
def nekobot_commands():
    return [CommandSpec("zzrel_tick", tick)]

@hookimpl
async def nekobot_plugin_start(ctx):
    STATE["ctx"] = ctx
"""


async def test_a_channel_name_with_a_tab_reaches_relay_subscribers(tmp_path: Path) -> None:
    from kernel.testing import MockBot
    from tests.plugin_factory import purge_modules, write_plugin

    async with api_server(tmp_path) as api:
        purge_modules("zzrel_tabs")
        write_plugin(api.plugin_dir, "zzrel_tabs", TAB_CHANNEL_PLUGIN)
        async with api.authed() as c:
            assert (await c.post("/api/plugins/rescan")).is_success
            assert (await c.post("/api/plugins/enable", json={"name": "zzrel_tabs"})).is_success
        url = api.ws_url()
        async with websockets.connect(url, additional_headers=api.headers) as ws:
            await ws.send(json.dumps({"action": "subscribe", "channels": ["zzrel\ttab"]}))
            with anyio.fail_after(PATIENCE):
                assert json.loads(await ws.recv())["type"] == "subscribed"
            assert await MockBot(api.kernel).receive("/zzrel_tick 3") == ["ticked"]
            with anyio.fail_after(PATIENCE):
                m = json.loads(await ws.recv())
            assert m == {"type": "message", "channel": "zzrel\ttab", "data": {"n": "3"}}
            assert api.hub.relay is not None
