"""`GET /api/logs` over a real server: structured records, filters, and paging."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.builtin_plugins.conftest import ApiServer
from tests.plugin_factory import purge_modules, write_plugin

pytestmark = pytest.mark.anyio
log = logging.getLogger("nekobot.tests.logs")

TALKER = """
from kernel import hookimpl

@hookimpl
async def nekobot_plugin_start(ctx):
    ctx.log.warning("zlg talker says hello")
    try:
        1 / 0
    except ZeroDivisionError:
        ctx.log.exception("zlg talker failed on purpose")
"""


def assert_error(r: httpx.Response, status: int, field: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "error" and body["details"]["field"] == field


async def items(c: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await c.get("/api/logs", params={"page_size": 100, **params})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]["items"]
    return found


async def test_records_are_structured_and_newest_first(api: ApiServer) -> None:
    log.info("zlg first")
    log.warning("zlg second")
    async with api.authed() as c:
        records = await items(c, q="zlg ")
        assert [r["message"] for r in records] == ["zlg second", "zlg first"]
        second = records[0]
        assert set(second) >= {"seq", "time", "level", "logger", "plugin", "message"}
        assert second["level"] == "WARNING" and second["logger"] == "nekobot.tests.logs"
        assert second["plugin"] is None
        assert abs(second["time"] - time.time()) < 60
        assert records[0]["seq"] > records[1]["seq"]
        oldest = await items(c, q="zlg ", order="asc")
        assert [r["message"] for r in oldest] == ["zlg first", "zlg second"]
        data = (await c.get("/api/logs", params={"page_size": 1, "q": "zlg "})).json()["data"]
        assert data["total"] == 2 and len(data["items"]) == 1


async def test_filters(api: ApiServer) -> None:
    purge_modules("zlg_talker")
    write_plugin(api.plugin_dir, "zlg_talker", TALKER)
    async with api.authed() as c:
        await c.post("/api/plugins/rescan")
        assert (await c.post("/api/plugins/enable", json={"name": "zlg_talker"})).is_success
        mine = await items(c, plugin="zlg_talker")
        messages = [r["message"] for r in mine]
        assert "zlg talker says hello" in messages
        assert all(r["plugin"] == "zlg_talker" for r in mine)
        failed = [r for r in mine if r["message"] == "zlg talker failed on purpose"]
        assert failed and "ZeroDivisionError" in failed[0]["exc_text"]

        log.debug("zlg-level debug")
        log.info("zlg-level info")
        log.error("zlg-level error")
        # `level` is a minimum; any case.
        assert {r["level"] for r in await items(c, q="zlg-level", level="warning")} == {"ERROR"}
        assert len(await items(c, q="zlg-level", level="INFO")) == 2
        assert await items(c, q="zlg-level", level="CRITICAL") == []
        # `q` is a case-insensitive substring of the message.
        assert [r["message"] for r in await items(c, q="ZLG-LEVEL ERR")] == ["zlg-level error"]
        assert await items(c, q="no such text anywhere") == []

        newest = (await items(c, q="zlg-level"))[0]
        since = newest["time"]
        assert newest in await items(c, q="zlg-level", since=str(since))
        assert await items(c, q="zlg-level", since=str(since + 1)) == []
        iso = datetime.fromtimestamp(since - 1, tz=UTC).isoformat()
        assert newest in await items(c, q="zlg-level", since=iso)
        assert await items(c, plugin="zlg_nobody") == []

        assert_error(await c.get("/api/logs", params={"level": "LOUD"}), 400, "level")
        assert_error(await c.get("/api/logs", params={"since": "yesterday"}), 400, "since")
        assert_error(await c.get("/api/logs", params={"lvl": "INFO"}), 400, "lvl")


async def test_custom_levels_and_sorting_by_severity(api: ApiServer) -> None:
    log.log(25, "zlg custom level")  # shows as "Level 25"
    log.warning("zlg sev warning")
    log.error("zlg sev error")
    log.info("zlg sev info")
    async with api.authed() as c:
        custom = await items(c, q="zlg custom level")
        assert custom and custom[0]["level"] == "Level 25"
        assert await items(c, q="zlg custom", level="INFO") == custom
        assert await items(c, q="zlg custom", level="WARNING") == []
        ordered = await items(c, q="zlg sev", sort_by="level", order="desc")
        assert [r["level"] for r in ordered] == ["ERROR", "WARNING", "INFO"]
        ordered = await items(c, q="zlg ", sort_by="level", order="asc")
        assert [r["level"] for r in ordered] == ["INFO", "Level 25", "WARNING", "ERROR"]


async def test_logs_require_a_token(api: ApiServer) -> None:
    async with api.client() as c:
        r = await c.get("/api/logs")
        assert r.status_code == 401
