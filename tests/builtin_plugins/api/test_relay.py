"""The `/ws` relay process: started on the first connection, stopped with the `api`
plugin, restarted after it dies; the hub serves in-process when it cannot start."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import anyio
import pytest
import websockets

from builtin_plugins.api.hub import Hub
from builtin_plugins.api.relay import RelayLink
from tests.builtin_plugins.conftest import ApiServer, api_server

pytestmark = pytest.mark.anyio


def the_hub(api: ApiServer) -> Hub:
    hub = api.kernel.services.get("ws.hub")
    assert isinstance(hub, Hub)
    return hub


async def pong(api: ApiServer) -> None:
    """Open a socket, ping, get the pong."""
    url = api.base_url.replace("http://", "ws://") + "/ws"
    async with websockets.connect(url, additional_headers=api.headers) as ws:
        await ws.send(json.dumps({"action": "ping"}))
        with anyio.fail_after(5):
            assert json.loads(await ws.recv()) == {"type": "pong"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_started_on_first_use_and_stopped_with_the_kernel(tmp_path: Path) -> None:
    async with api_server(tmp_path) as api:
        hub = the_hub(api)
        assert hub.relay is None  # nobody connected yet: no process
        await pong(api)
        assert hub.relay is not None and hub.relay.pid is not None
        pid = hub.relay.pid
        assert alive(pid)
        await pong(api)
        assert hub.relay.pid == pid  # one relay for every connection
    with anyio.fail_after(5):
        while alive(pid):  # noqa: ASYNC110 (polling another process)
            await anyio.sleep(0.01)


async def test_a_relay_that_dies_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with api_server(tmp_path) as api:
        hub = the_hub(api)
        await pong(api)
        assert hub.relay is not None and hub.relay.pid is not None
        old = hub.relay.pid
        url = api.base_url.replace("http://", "ws://") + "/ws"
        async with websockets.connect(url, additional_headers=api.headers) as ws:
            os.kill(old, signal.SIGKILL)
            # Its connections drop (no close frame: the process is gone) ...
            with anyio.fail_after(5), pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        with anyio.fail_after(5):
            while hub.relay is not None:  # noqa: ASYNC110 (the bot notices the end)
                await anyio.sleep(0.01)
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
        hub = the_hub(api)
        assert hub.relay is None
        assert any("did not start" in r.getMessage() for r in caplog.records)
        # Not retried for every connection.
        caplog.clear()
        await pong(api)
        assert not any("did not start" in r.getMessage() for r in caplog.records)
