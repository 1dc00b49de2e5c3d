"""`GET /api/logs?source=file` reads the JSON-lines log file back."""

from __future__ import annotations

import pytest

from kernel.testing import wait_until
from tests.builtin_plugins.conftest import ApiServer

pytestmark = pytest.mark.anyio


async def test_logs_from_the_file(api: ApiServer) -> None:
    api.kernel.log.warning("written to the file")
    async with api.authed() as c:

        async def in_the_file() -> bool:  # written by a thread of its own: nothing to wait on
            r = await c.get("/api/logs", params={"source": "file", "q": "written to the file"})
            assert r.status_code == 200
            return bool(r.json()["data"]["total"])

        await wait_until(in_the_file, interval=0.02)
        r = await c.get("/api/logs", params={"source": "file", "q": "written to the file"})
        item = r.json()["data"]["items"][0]
        assert item["level"] == "WARNING"
        assert item["seq"] > 0
        r = await c.get("/api/logs", params={"source": "disk"})
        assert r.status_code == 400
        assert r.json()["details"]["field"] == "source"
