"""`/api/commands*` over a real server: listing, conflicts and their resolution, aliases."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from kernel.testing import MockBot
from tests.builtin_plugins.conftest import ApiServer
from tests.plugin_factory import purge_modules, write_plugin

pytestmark = pytest.mark.anyio

DUP = """
from kernel import CommandSpec, hookimpl

async def dup(cmd):
    return "from {name}"

@hookimpl
def nekobot_commands():
    return [CommandSpec("zca_dup", dup, aliases=("zca_d",), description="{name}'s dup",
                        usage="/zca_dup")]
"""


def assert_error(r: httpx.Response, status: int, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    body = r.json()
    assert body["status"] == "error" and body["message"] and body["code"]
    if field is not None:
        assert body.get("details", {}).get("field") == field, body


async def add_plugins(api: ApiServer, c: httpx.AsyncClient, *names: str) -> None:
    for name in names:
        purge_modules(name)
        write_plugin(api.plugin_dir, name, DUP.replace("{name}", name))
    await c.post("/api/plugins/rescan")
    for name in names:
        r = await c.post("/api/plugins/enable", json={"name": name})
        assert r.status_code == 200, r.text


async def commands(c: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await c.get("/api/commands", params={"page_size": 100, **params})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]["items"]
    return found


async def test_list_commands(api: ApiServer) -> None:
    async with api.authed() as c:
        items = await commands(c)
        help_ = next(i for i in items if i["name"] == "help")
        assert help_["aliases"] == ["h"]
        assert help_["qualified_name"] == "help:help"
        assert help_["plugin"] == "help"
        assert help_["description"] and help_["usage"]
        assert help_["enabled"] is True and help_["holds_name"] is True
        assert await commands(c, plugin="help") == [help_]
        assert await commands(c, plugin="zca_nobody") == []
        # A disabled plugin's commands are gone.
        await c.post("/api/plugins/disable", json={"name": "help"})
        assert await commands(c, plugin="help") == []


async def test_conflicts_and_their_resolution(api: ApiServer) -> None:
    bot = MockBot(api.kernel)
    async with api.authed() as c:
        await add_plugins(api, c, "zca_one", "zca_two")
        r = await c.get("/api/commands/conflicts")
        assert r.status_code == 200
        data = r.json()["data"]
        by_key = {i["key"]: i for i in data["items"]}
        assert set(by_key) == {"zca_dup", "zca_d"} and data["total"] == 2
        conflict = by_key["zca_dup"]
        assert {c["plugin"] for c in conflict["candidates"]} == {"zca_one", "zca_two"}
        assert {c["qualified_name"] for c in conflict["candidates"]} == {
            "zca_one:zca_dup",
            "zca_two:zca_dup",
        }
        holder = conflict["holder"]
        other = "zca_two" if holder == "zca_one" else "zca_one"
        assert conflict["resolution"] is None
        assert await bot.receive("/zca_dup") == [f"from {holder}"]
        # Both stay reachable by their qualified names.
        assert await bot.receive(f"/{other}:zca_dup") == [f"from {other}"]
        holding = {
            i["plugin"]: i["holds_name"] for i in await commands(c) if i["name"] == "zca_dup"
        }
        assert holding == {holder: True, other: False}

        r = await c.post(
            "/api/commands/conflicts/resolve", json={"key": "ZCA_DUP", "plugin": other}
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["holder"] == other
        assert r.json()["data"]["conflict"]["resolution"] == other
        assert await bot.receive("/zca_dup") == [f"from {other}"]
        stored = await api.kernel.storage.state_get("kernel", "commands", {})
        assert stored["resolutions"] == {"zca_dup": other}

        # The choice survives the holder being reloaded.
        assert (await c.post("/api/plugins/reload", json={"name": holder})).is_success
        assert await bot.receive("/zca_dup") == [f"from {other}"]

        # Withdrawing the choice keeps the current holder.
        r = await c.post("/api/commands/conflicts/resolve", json={"key": "zca_dup", "plugin": None})
        assert r.status_code == 200
        assert r.json()["data"]["conflict"]["resolution"] is None
        assert await bot.receive("/zca_dup") == [f"from {other}"]

        # Errors.
        path = "/api/commands/conflicts/resolve"
        assert_error(await c.post(path, json={"key": "zca_dup"}), 400, "plugin")
        assert_error(await c.post(path, json={"plugin": "x"}), 400, "key")
        assert_error(await c.post(path, json={"key": "a b", "plugin": "zca_one"}), 400, "key")
        assert_error(await c.post(path, json={"key": "", "plugin": "zca_one"}), 400, "key")
        assert_error(await c.post(path, json={"key": "zca_dup", "plugin": 3}), 400, "plugin")
        assert_error(await c.post(path, json={"key": "zca_dup", "plugin": "help"}), 404, "plugin")
        assert_error(await c.post(path, json={"key": "nokey", "plugin": "zca_one"}), 404)

        # Disabling one side ends the conflict.
        await c.post("/api/plugins/disable", json={"name": other})
        assert (await c.get("/api/commands/conflicts")).json()["data"]["items"] == []
        assert await bot.receive("/zca_dup") == [f"from {holder}"]


async def test_aliases(api: ApiServer) -> None:
    bot = MockBot(api.kernel)
    async with api.authed() as c:
        r = await c.post("/api/commands/aliases", json={"alias": "Aide", "command": "help:help"})
        assert r.status_code == 201, r.text
        assert r.json()["data"] == {"alias": "aide", "command": "help:help", "holder": "help"}
        assert (await bot.receive("/aide"))[0].startswith("Commands:")
        help_ = next(i for i in await commands(c) if i["name"] == "help")
        assert help_["admin_aliases"] == ["aide"]
        stored = await api.kernel.storage.state_get("kernel", "commands", {})
        assert stored["aliases"] == {"aide": "help:help"}

        path = "/api/commands/aliases"
        assert_error(
            await c.post(path, json={"alias": "x y", "command": "help:help"}), 400, "alias"
        )
        assert_error(await c.post(path, json={"alias": "zz", "command": "help:nope"}), 404)
        assert_error(await c.post(path, json={"alias": "zz"}), 400, "command")
        assert_error(await c.post(path, json={"alias": 1, "command": "help:help"}), 400, "alias")

        r = await c.request("DELETE", path, json={"alias": "AIDE"})
        assert r.status_code == 200 and r.json()["data"] == {"removed": "aide"}
        assert await bot.receive("/aide") == []
        assert_error(await c.request("DELETE", path, json={"alias": "aide"}), 404, "alias")
        assert_error(await c.request("DELETE", path, json={}), 400, "alias")
        assert_error(await c.request("DELETE", path, json={"alias": "a b"}), 400, "alias")


async def test_commands_endpoints_require_a_token(api: ApiServer) -> None:
    async with api.client() as c:
        for method, path in (
            ("GET", "/api/commands"),
            ("GET", "/api/commands/conflicts"),
            ("POST", "/api/commands/conflicts/resolve"),
            ("POST", "/api/commands/aliases"),
            ("DELETE", "/api/commands/aliases"),
        ):
            assert_error(await c.request(method, path), 401)
