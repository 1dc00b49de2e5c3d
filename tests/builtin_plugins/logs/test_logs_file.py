"""`GET /api/logs?source=file` reads the JSON-lines log file back."""

from __future__ import annotations

import anyio
import pytest

from tests.builtin_plugins.conftest import ApiServer

pytestmark = pytest.mark.anyio


async def test_logs_from_the_file(api: ApiServer) -> None:
    api.kernel.log.warning("written to the file")
    async with api.authed() as c:
        for _ in range(100):  # the file is written by a listener thread
            r = await c.get("/api/logs", params={"source": "file", "q": "written to the file"})
            assert r.status_code == 200
            if r.json()["data"]["total"]:
                break
            await anyio.sleep(0.02)
        item = r.json()["data"]["items"][0]
        assert item["level"] == "WARNING"
        assert item["seq"] > 0
        r = await c.get("/api/logs", params={"source": "disk"})
        assert r.status_code == 400
        assert r.json()["details"]["field"] == "source"
