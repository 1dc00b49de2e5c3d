"""What `GET /api/plugins` tells an admin beyond the state: the last failed reload, and
the command keys a plugin contests with another."""

from __future__ import annotations

import time

import pytest

from tests.builtin_plugins.conftest import ApiServer
from tests.builtin_plugins.plugin_admin.test_plugin_admin import (
    add_plugin,
    assert_error,
    plugin,
    route_plugin,
)
from tests.plugin_factory import write_plugin

pytestmark = pytest.mark.anyio

CLAIMS = """
from kernel import CommandSpec, hookimpl

async def answer(cmd):
    return {name!r}

@hookimpl
def nekobot_commands():
    return [CommandSpec("zpd_same", answer)]
"""


async def test_a_failed_reload_shows_on_the_plugin_until_a_reload_succeeds(
    api: ApiServer,
) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpd_frail", route_plugin("zpd_frail", "1"))
        assert (await plugin(c, "zpd_frail"))["last_reload_error"] is None
        write_plugin(api.plugin_dir, "zpd_frail", "def broken(:\n")
        before = time.time()
        body = assert_error(await c.post("/api/plugins/reload", json={"name": "zpd_frail"}), 422)
        p = await plugin(c, "zpd_frail")
        # The old generation serves, so `error` keeps meaning "it failed": null.
        assert p["state"] == "active" and p["error"] is None
        failure = p["last_reload_error"]
        assert failure["message"] == body["message"]
        assert "SyntaxError" in failure["message"] and "previous version kept" in failure["message"]
        assert before <= failure["time"] <= time.time()
        # Still shown by a later listing; gone once a reload goes through.
        assert (await plugin(c, "zpd_frail"))["last_reload_error"] == failure
        write_plugin(api.plugin_dir, "zpd_frail", route_plugin("zpd_frail", "2"))
        r = await c.post("/api/plugins/reload", json={"name": "zpd_frail"})
        assert r.status_code == 200, r.text
        assert r.json()["data"]["plugin"]["last_reload_error"] is None
        assert (await plugin(c, "zpd_frail"))["last_reload_error"] is None


async def test_a_command_clash_shows_on_both_plugins(api: ApiServer) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpd_first", CLAIMS.format(name="zpd_first"))
        assert (await plugin(c, "zpd_first"))["conflicts"] == []
        await add_plugin(api, c, "zpd_second", CLAIMS.format(name="zpd_second"))
        expected = {
            "key": "zpd_same",
            "candidates": [
                {"plugin": "zpd_first", "qualified_name": "zpd_first:zpd_same"},
                {"plugin": "zpd_second", "qualified_name": "zpd_second:zpd_same"},
            ],
            "holder": "zpd_first",
            "resolution": None,
        }
        assert (await plugin(c, "zpd_first"))["conflicts"] == [expected]
        assert (await plugin(c, "zpd_second"))["conflicts"] == [expected]
        assert (await plugin(c, "api"))["conflicts"] == []
        # Resolved by the admin: both entries show the new holder.
        r = await c.post(
            "/api/commands/conflicts/resolve", json={"key": "zpd_same", "plugin": "zpd_second"}
        )
        assert r.status_code == 200, r.text
        for name in ("zpd_first", "zpd_second"):
            (shown,) = (await plugin(c, name))["conflicts"]
            assert shown["holder"] == "zpd_second" and shown["resolution"] == "zpd_second"
        # Gone with the second plugin.
        assert (await c.post("/api/plugins/disable", json={"name": "zpd_second"})).is_success
        assert (await plugin(c, "zpd_first"))["conflicts"] == []
