"""`/api/plugins*` over a real server: listing, enable/disable/reload/delete, upload,
configuration with secrets, error statuses, and swaps while requests are in flight."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import pytest

from kernel import PluginState
from kernel.testing import PATIENCE
from tests.builtin_plugins.conftest import ApiServer
from tests.plugin_factory import manifest_text, purge_modules, write_plugin

pytestmark = pytest.mark.anyio

ESSENTIAL = ("api", "auth", "plugin_admin")
OTHER_BUILTINS = ("commands_admin", "settings", "logs", "help")

ROUTE_PLUGIN = """
from starlette.responses import JSONResponse
from kernel import CommandSpec, RouteSpec, hookimpl

VERSION = {version!r}

async def show(request):
    return JSONResponse({{"version": VERSION}})

async def hello(cmd):
    return "hello " + VERSION

@hookimpl
def nekobot_routes():
    return [RouteSpec("/api/{name}/show", show, name="{name}_show")]

@hookimpl
def nekobot_commands():
    return [CommandSpec("{name}_hi", hello)]
"""

CONFIG_PLUGIN = """
from starlette.responses import JSONResponse
from kernel import RouteSpec, hookimpl

STATE = {"changes": 0}

async def show(request):
    return JSONResponse({"config": dict(STATE["ctx"].config), "changes": STATE["changes"]})

@hookimpl
def nekobot_routes():
    return [RouteSpec("/api/zpa_cfg/show", show)]

@hookimpl
async def nekobot_plugin_start(ctx):
    STATE["ctx"] = ctx

@hookimpl
async def nekobot_config_changed(ctx, config):
    STATE["changes"] += 1
"""

CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "api_key": {"type": "string", "writeOnly": True, "default": ""},
        "password": {"type": "string", "format": "password"},
        "model": {"type": "string", "default": "small"},
        "retries": {"type": "integer", "minimum": 0, "maximum": 5, "default": 1},
        "account": {
            "type": "object",
            "properties": {
                "user": {"type": "string"},
                "token": {"type": "string", "x-secret": True},
            },
        },
    },
}

SLOW_PLUGIN = """
import anyio
from starlette.responses import JSONResponse
from kernel import RouteSpec, hookimpl

GEN = {gen}

async def slow(request):
    await anyio.sleep(0.2)  # work that keeps the request in flight while plugins swap
    return JSONResponse({{"gen": GEN}})

@hookimpl
def nekobot_routes():
    return [RouteSpec("/api/zpa_slow/work", slow)]
"""


def assert_error(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    body = r.json()
    assert body["status"] == "error" and body["message"] and body["code"]
    if field is not None:
        assert body.get("details", {}).get("field") == field, body
    return dict(body)


async def add_plugin(
    api: ApiServer,
    c: httpx.AsyncClient,
    name: str,
    code: str,
    manifest: Mapping[str, Any] | None = None,
    *,
    enable: bool = True,
) -> None:
    """Write a user plugin, let the server find it, and enable it."""
    purge_modules(name)
    write_plugin(api.plugin_dir, name, code, manifest=manifest)
    r = await c.post("/api/plugins/rescan")
    assert r.status_code == 200, r.text
    assert name in r.json()["data"]["added"]
    if enable:
        r = await c.post("/api/plugins/enable", json={"name": name})
        assert r.status_code == 200, r.text


def route_plugin(name: str, version: str) -> str:
    return ROUTE_PLUGIN.format(name=name, version=version)


async def plugin(c: httpx.AsyncClient, name: str) -> dict[str, Any]:
    items = (await c.get("/api/plugins", params={"page_size": 100})).json()["data"]["items"]
    found = [p for p in items if p["name"] == name]
    assert found, name
    return dict(found[0])


async def test_list_shows_every_plugin_with_its_details(api: ApiServer) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_list", route_plugin("zpa_list", "1"))
        r = await c.get("/api/plugins", params={"page_size": 100})
        assert r.status_code == 200
        data = r.json()["data"]
        by_name = {p["name"]: p for p in data["items"]}
        assert set(by_name) >= {*ESSENTIAL, *OTHER_BUILTINS, "zpa_list"}
        assert data["total"] == len(by_name)
        for name in ESSENTIAL:
            assert by_name[name]["essential"] is True
            assert by_name[name]["source"] == "builtin"
        for name in OTHER_BUILTINS:
            assert by_name[name]["essential"] is False
        p = by_name["zpa_list"]
        assert set(p) >= {
            "name",
            "version",
            "description",
            "author",
            "source",
            "essential",
            "state",
            "error",
            "enabled",
            "commands",
            "routes",
            "hooks",
            "tools",
            "loaded_at",
            "reload_count",
        }
        assert p["source"] == "user" and p["state"] == "active" and p["enabled"] is True
        assert p["commands"] == ["zpa_list:zpa_list_hi"]
        assert p["routes"] == ["GET /api/zpa_list/show", "HEAD /api/zpa_list/show"] or p[
            "routes"
        ] == ["GET /api/zpa_list/show"]
        assert p["hooks"] == ["nekobot_commands", "nekobot_routes"]
        assert p["reload_count"] == 0 and p["loaded_at"] > 0

        users = (await c.get("/api/plugins", params={"source": "user"})).json()["data"]
        assert [p["name"] for p in users["items"]] == ["zpa_list"]
        await c.post("/api/plugins/disable", json={"name": "zpa_list"})
        disabled = (await c.get("/api/plugins", params={"state": "disabled"})).json()["data"]
        assert [p["name"] for p in disabled["items"]] == ["zpa_list"]


TOOL_PLUGIN = """
from kernel import ToolSpec, hookimpl

async def echo(call):
    return call.arguments

@hookimpl
def nekobot_llm_tools():
    return [ToolSpec("zpa_echo", echo), ToolSpec("zpa_alpha", echo)]
"""


async def test_a_plugin_shows_the_tools_it_offers(api: ApiServer) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_tools", TOOL_PLUGIN)
        shown = await plugin(c, "zpa_tools")
        assert (shown["tools"], shown["hooks"]) == (
            ["zpa_alpha", "zpa_echo"],
            ["nekobot_llm_tools"],
        )
        r = await c.post("/api/plugins/disable", json={"name": "zpa_tools"})
        assert r.json()["data"]["plugin"]["tools"] == []


async def test_enable_disable_reload_a_user_plugin(api: ApiServer) -> None:
    events: list[str] = []
    api.kernel.subscribe_events(lambda e: events.append(f"{e.type} {e.plugin}"))
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_cycle", route_plugin("zpa_cycle", "1"), enable=False)
        assert (await plugin(c, "zpa_cycle"))["state"] != "active"
        assert_error(await c.get("/api/zpa_cycle/show"), 404)

        r = await c.post("/api/plugins/enable", json={"name": "zpa_cycle"})
        assert r.status_code == 200
        data = r.json()["data"]
        assert data["plugin"]["state"] == "active" and data["conflicts"] == []
        assert (await c.get("/api/zpa_cycle/show")).json() == {"version": "1"}
        # Enabling again is harmless.
        r = await c.post("/api/plugins/enable", json={"name": "zpa_cycle"})
        assert r.status_code == 200 and r.json()["data"]["changed"] is False

        write_plugin(api.plugin_dir, "zpa_cycle", route_plugin("zpa_cycle", "2"))
        r = await c.post("/api/plugins/reload", json={"name": "zpa_cycle"})
        assert r.status_code == 200, r.text
        assert r.json()["data"]["plugin"]["reload_count"] == 1
        assert (await c.get("/api/zpa_cycle/show")).json() == {"version": "2"}

        r = await c.post("/api/plugins/disable", json={"name": "zpa_cycle"})
        assert r.status_code == 200
        assert r.json()["data"]["plugin"]["state"] == "disabled"
        assert r.json()["data"]["plugin"]["enabled"] is False
        assert_error(await c.get("/api/zpa_cycle/show"), 404)
        r = await c.post("/api/plugins/disable", json={"name": "zpa_cycle"})
        assert r.status_code == 200 and r.json()["data"]["changed"] is False
    assert "plugin.enabled zpa_cycle" in events
    assert "plugin.reloaded zpa_cycle" in events
    assert "plugin.disabled zpa_cycle" in events
    assert api.kernel.commands.lookup("zpa_cycle_hi") is None


async def test_essential_and_builtin_plugins_are_protected(api: ApiServer) -> None:
    async with api.authed() as c:
        for name in ESSENTIAL:
            body = assert_error(await c.post("/api/plugins/disable", json={"name": name}), 403)
            assert name in body["message"]
            assert_error(await c.delete("/api/plugins/delete", params={"name": name}), 403)
            assert_error(await c.request("DELETE", "/api/plugins/delete", json={"name": name}), 403)
        for name in OTHER_BUILTINS:
            assert_error(await c.delete("/api/plugins/delete", params={"name": name}), 403)
        # Everything still works.
        for name in ESSENTIAL:
            assert (await plugin(c, name))["state"] == "active"
        # A non-essential builtin can be disabled and enabled again.
        r = await c.post("/api/plugins/disable", json={"name": "logs"})
        assert r.status_code == 200
        assert_error(await c.get("/api/logs"), 404)
        assert (await c.post("/api/plugins/enable", json={"name": "logs"})).status_code == 200
        assert (await c.get("/api/logs")).status_code == 200
        # Essential plugins can be reloaded (that is how they are upgraded).
        r = await c.post("/api/plugins/reload", json={"name": "auth"})
        assert r.status_code == 200, r.text
        assert (await c.get("/api/plugins")).status_code == 200
        # plugin_admin reloading itself cannot wait for its own request: 202, then done.
        reloaded = anyio.Event()
        api.kernel.subscribe_events(
            lambda e: (
                reloaded.set()
                if e.type == "plugin.reloaded" and e.plugin == "plugin_admin"
                else None
            )
        )
        r = await c.post("/api/plugins/reload", json={"name": "plugin_admin"})
        assert r.status_code == 202, r.text
        assert r.json()["data"]["scheduled"] is True
        with anyio.fail_after(PATIENCE):
            await reloaded.wait()
        p = await plugin(c, "plugin_admin")
        assert p["state"] == "active" and p["reload_count"] == 1
        # Its configuration (it has none) applies without a reload, so without waiting.
        r = await c.put("/api/plugins/config", json={"name": "plugin_admin", "config": {}})
        assert r.status_code == 200, r.text


async def test_unknown_plugin_is_404_everywhere(api: ApiServer) -> None:
    async with api.authed() as c:
        for path in ("/api/plugins/enable", "/api/plugins/disable", "/api/plugins/reload"):
            body = assert_error(await c.post(path, json={"name": "zpa_nobody"}), 404)
            assert "zpa_nobody" in body["message"]
        assert_error(await c.delete("/api/plugins/delete", params={"name": "zpa_nobody"}), 404)
        assert_error(await c.get("/api/plugins/config", params={"name": "zpa_nobody"}), 404)
        r = await c.put("/api/plugins/config", json={"name": "zpa_nobody", "config": {}})
        assert_error(r, 404)


async def test_bad_requests_name_the_field(api: ApiServer) -> None:
    async with api.authed() as c:
        assert_error(await c.post("/api/plugins/enable", json={}), 400, "name")
        assert_error(await c.post("/api/plugins/enable"), 400, "name")
        assert_error(await c.post("/api/plugins/enable", json={"name": ["x"]}), 400, "name")
        r = await c.post("/api/plugins/enable", json={"name": "x"}, params={"force": "1"})
        assert_error(r, 400, "force")
        assert_error(await c.delete("/api/plugins/delete"), 400, "name")
        r = await c.delete("/api/plugins/delete", params={"name": "x", "keep_data": "maybe"})
        assert_error(r, 400, "keep_data")
        r = await c.delete("/api/plugins/delete", params={"name": "x", "wipe": "1"})
        assert_error(r, 400, "wipe")
        assert_error(await c.get("/api/plugins/config"), 400, "name")
        r = await c.get("/api/plugins/config", params={"name": "help", "x": "1"})
        assert_error(r, 400, "x")
        assert_error(await c.put("/api/plugins/config", json={"name": "help"}), 400, "config")
        r = await c.put("/api/plugins/config", json={"name": "help", "config": []})
        assert_error(r, 400, "config")
        assert_error(await c.post("/api/plugins/rescan", json={"x": 1}), 400, "x")


async def test_reload_failure_is_422_and_the_old_generation_keeps_serving(
    api: ApiServer,
) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_frail", route_plugin("zpa_frail", "1"))
        # A syntax error in the new version.
        write_plugin(api.plugin_dir, "zpa_frail", "def broken(:\n")
        body = assert_error(await c.post("/api/plugins/reload", json={"name": "zpa_frail"}), 422)
        assert "zpa_frail" in body["message"]
        assert (await c.get("/api/zpa_frail/show")).json() == {"version": "1"}
        p = await plugin(c, "zpa_frail")
        assert p["state"] == "active" and p["reload_count"] == 0
        # A new version whose start hook fails.
        write_plugin(
            api.plugin_dir,
            "zpa_frail",
            route_plugin("zpa_frail", "2")
            + "\n@hookimpl\nasync def nekobot_plugin_start(ctx):\n    raise RuntimeError('no')\n",
        )
        assert_error(await c.post("/api/plugins/reload", json={"name": "zpa_frail"}), 422)
        assert (await c.get("/api/zpa_frail/show")).json() == {"version": "1"}
        # A new version with a broken manifest.
        (api.plugin_dir / "zpa_frail" / "plugin.toml").write_text("name = [", encoding="utf-8")
        assert_error(await c.post("/api/plugins/reload", json={"name": "zpa_frail"}), 422)
        assert (await c.get("/api/zpa_frail/show")).json() == {"version": "1"}
        assert (await plugin(c, "zpa_frail"))["state"] == "active"
        # Fixed: the reload goes through.
        write_plugin(api.plugin_dir, "zpa_frail", route_plugin("zpa_frail", "3"))
        assert (await c.post("/api/plugins/reload", json={"name": "zpa_frail"})).status_code == 200
        assert (await c.get("/api/zpa_frail/show")).json() == {"version": "3"}


async def test_enabling_a_broken_plugin_is_422(api: ApiServer) -> None:
    async with api.authed() as c:
        await add_plugin(
            api,
            c,
            "zpa_broken",
            "from kernel import hookimpl\n@hookimpl\ndef nekobot_routes():\n    return [1]\n",
            enable=False,
        )
        body = assert_error(await c.post("/api/plugins/enable", json={"name": "zpa_broken"}), 422)
        assert "RouteSpec" in body["message"]
        p = await plugin(c, "zpa_broken")
        assert p["state"] == "failed" and p["error"]


async def test_route_conflict_is_409(api: ApiServer) -> None:
    code = (
        "from starlette.responses import JSONResponse\n"
        "from kernel import RouteSpec, hookimpl\n"
        "async def h(request):\n    return JSONResponse({})\n"
        "@hookimpl\ndef nekobot_routes():\n"
        "    return [RouteSpec('/api/health', h, public=True)]\n"
    )
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_clash", code, enable=False)
        r = await c.post("/api/plugins/enable", json={"name": "zpa_clash"})
        body = assert_error(r, 409)
        assert body["details"]["conflict"]["holder"] == "api"
        # The holder keeps its route.
        assert (await c.get("/api/health")).json()["data"]["status"] == "ok"


async def test_delete_a_user_plugin(api: ApiServer) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_gone", route_plugin("zpa_gone", "1"))
        await api.kernel.storage.state_set("plugin_config", "zpa_gone", {"x": 1})
        r = await c.delete("/api/plugins/delete", params={"name": "zpa_gone", "keep_data": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["data"]["deleted"] is True and r.json()["data"]["data_kept"] is True
        assert not (api.plugin_dir / "zpa_gone").exists()
        assert_error(await c.get("/api/zpa_gone/show"), 404)
        names = [p["name"] for p in (await c.get("/api/plugins")).json()["data"]["items"]]
        assert "zpa_gone" not in names
        assert await api.kernel.storage.state_get("plugin_config", "zpa_gone", None) == {"x": 1}
        assert_error(await c.delete("/api/plugins/delete", params={"name": "zpa_gone"}), 404)

        # By body, dropping the data.
        await add_plugin(api, c, "zpa_gone2", route_plugin("zpa_gone2", "1"))
        await api.kernel.storage.state_set("plugin_config", "zpa_gone2", {"x": 1})
        r = await c.request("DELETE", "/api/plugins/delete", json={"name": "zpa_gone2"})
        assert r.status_code == 200 and r.json()["data"]["data_kept"] is False
        assert await api.kernel.storage.state_get("plugin_config", "zpa_gone2", None) is None


async def test_rescan_finds_only_new_plugins(api: ApiServer) -> None:
    async with api.authed() as c:
        r = await c.post("/api/plugins/rescan")
        assert r.json()["data"] == {"added": []}
        write_plugin(api.plugin_dir, "zpa_new", route_plugin("zpa_new", "1"))
        purge_modules("zpa_new")
        assert (await c.post("/api/plugins/rescan")).json()["data"] == {"added": ["zpa_new"]}
        assert (await c.post("/api/plugins/rescan")).json()["data"] == {"added": []}


def _zip(name: str, code: str, manifest: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/__init__.py", code)
        z.writestr(f"{name}/plugin.toml", manifest or manifest_text(name))
    return buf.getvalue()


async def test_upload(api: ApiServer) -> None:
    purge_modules("zpa_up")
    archive = _zip("zpa_up", route_plugin("zpa_up", "1"))
    async with api.authed() as c:
        r = await c.post(
            "/api/plugins/upload", files={"file": ("p.zip", archive)}, data={"dry_run": "true"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["dry_run"] is True and r.json()["data"]["installed"] is False
        assert not (api.plugin_dir / "zpa_up").exists()

        r = await c.post(
            "/api/plugins/upload", files={"file": ("p.zip", archive)}, data={"enable": "true"}
        )
        assert r.status_code == 201, r.text
        assert r.json()["data"]["plugin"]["state"] == "active"
        assert (await c.get("/api/zpa_up/show")).json() == {"version": "1"}

        # Again without overwrite: refused, the installed one keeps serving.
        r = await c.post("/api/plugins/upload", files={"file": ("p.zip", archive)})
        assert_error(r, 409)
        assert (await c.get("/api/zpa_up/show")).json() == {"version": "1"}
        newer = _zip("zpa_up", route_plugin("zpa_up", "2"))
        r = await c.post(
            "/api/plugins/upload", files={"file": ("p.zip", newer)}, data={"overwrite": "yes"}
        )
        assert r.status_code == 201, r.text
        assert (await c.get("/api/zpa_up/show")).json() == {"version": "2"}

        assert_error(await c.post("/api/plugins/upload", json={"file": "x"}), 400, "file")
        r = await c.post("/api/plugins/upload", data={"enable": "true"}, files={"x": ("a", b"")})
        assert_error(r, 400, "x")
        r = await c.post("/api/plugins/upload", files={"file": ("p.zip", b"not a zip")})
        assert_error(r, 400)
        r = await c.post(
            "/api/plugins/upload", files={"file": ("p.zip", archive)}, data={"enable": "maybe"}
        )
        assert_error(r, 400, "enable")


async def test_plugin_config_with_secrets(api: ApiServer) -> None:
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_cfg", CONFIG_PLUGIN, {"config_schema": CONFIG_SCHEMA})
        r = await c.get("/api/plugins/config", params={"name": "zpa_cfg"})
        assert r.status_code == 200
        data = r.json()["data"]
        assert data["schema"] == CONFIG_SCHEMA
        assert data["config"] == {"api_key": "", "model": "small", "retries": 1}

        secret = "sk-abcdefghijklmnopqrstuvwxyz"
        r = await c.put(
            "/api/plugins/config",
            json={
                "name": "zpa_cfg",
                "config": {
                    "api_key": secret,
                    "password": "hunter2hunter2",
                    "account": {"user": "neko", "token": "tok-0123456789abcdef"},
                },
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["config"]["api_key"] == "sk-…wxyz"
        for plain in (secret, "hunter2", "tok-0123456789abcdef"):
            assert plain not in r.text
        shown = (await c.get("/api/plugins/config", params={"name": "zpa_cfg"})).json()["data"]
        assert shown["config"]["api_key"] == "sk-…wxyz"
        # A short secret gives nothing away; nested secrets are masked too.
        assert shown["config"]["password"] == "…"
        assert shown["config"]["account"] == {"user": "neko", "token": "tok…cdef"}
        for plain in (secret, "hunter2", "tok-0123456789abcdef"):
            assert plain not in str(shown)
        # Applied live through nekobot_config_changed, without a reload.
        live = (await c.get("/api/zpa_cfg/show")).json()
        assert live["config"]["api_key"] == secret and live["changes"] == 1
        assert (await plugin(c, "zpa_cfg"))["reload_count"] == 0

        # Writing back what GET showed keeps the secrets.
        config = {**shown["config"], "model": "large"}
        r = await c.put("/api/plugins/config", json={"name": "zpa_cfg", "config": config})
        assert r.status_code == 200, r.text
        live = (await c.get("/api/zpa_cfg/show")).json()
        assert live["config"] == {
            "api_key": secret,
            "password": "hunter2hunter2",
            "model": "large",
            "retries": 1,
            "account": {"user": "neko", "token": "tok-0123456789abcdef"},
        }
        # A new value replaces a secret; so does an empty one.
        config = {**shown["config"], "api_key": "", "password": "new-password"}
        r = await c.put("/api/plugins/config", json={"name": "zpa_cfg", "config": config})
        assert r.status_code == 200, r.text
        live = (await c.get("/api/zpa_cfg/show")).json()
        assert live["config"]["api_key"] == "" and live["config"]["password"] == "new-password"
        assert live["config"]["account"]["token"] == "tok-0123456789abcdef"
        assert live["changes"] == 3

        # Invalid: 400 naming the field, nothing stored or applied.
        stored = await api.kernel.storage.state_get("plugin_config", "zpa_cfg", None)
        for bad, field in (
            ({"retries": 9}, "retries"),
            ({"retries": "1"}, "retries"),
            ({"model": 3}, "model"),
            ({"unknown": 1}, "unknown"),
            ({"account": {"user": 1}}, "account.user"),
        ):
            r = await c.put("/api/plugins/config", json={"name": "zpa_cfg", "config": bad})
            assert_error(r, 400, field)
        assert await api.kernel.storage.state_get("plugin_config", "zpa_cfg", None) == stored
        assert (await c.get("/api/zpa_cfg/show")).json() == live
        assert secret not in (await c.get("/api/plugins/config?name=zpa_cfg")).text


async def test_a_secret_default_written_back_masked_stays_the_default(api: ApiServer) -> None:
    default = "sk-default-0123456789abcdef"
    schema = {
        "type": "object",
        "properties": {
            "key": {"type": "string", "writeOnly": True, "default": default},
            "servers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"token": {"type": "string", "format": "password"}},
                },
            },
        },
    }
    async with api.authed() as c:
        await add_plugin(
            api,
            c,
            "zpa_cfg3",
            CONFIG_PLUGIN.replace("zpa_cfg", "zpa_cfg3"),
            {"config_schema": schema},
        )
        shown = (await c.get("/api/plugins/config", params={"name": "zpa_cfg3"})).json()["data"]
        assert shown["config"] == {"key": "sk-…cdef"}
        r = await c.put("/api/plugins/config", json={"name": "zpa_cfg3", "config": shown["config"]})
        assert r.status_code == 200, r.text
        live = (await c.get("/api/zpa_cfg3/show")).json()
        assert live["config"] == {"key": default}
        # Secrets in arrays of objects.
        tokens = [{"token": "first-token-0123456789"}, {"token": "second-token-0123456789"}]
        r = await c.put(
            "/api/plugins/config", json={"name": "zpa_cfg3", "config": {"servers": tokens}}
        )
        assert r.json()["data"]["config"]["servers"] == [
            {"token": "fir…6789"},
            {"token": "sec…6789"},
        ]
        shown = r.json()["data"]["config"]
        shown["servers"].append({"token": "third-token-0123456789"})
        r = await c.put("/api/plugins/config", json={"name": "zpa_cfg3", "config": shown})
        assert r.status_code == 200, r.text
        live = (await c.get("/api/zpa_cfg3/show")).json()
        assert [s["token"] for s in live["config"]["servers"]] == [
            "first-token-0123456789",
            "second-token-0123456789",
            "third-token-0123456789",
        ]


async def test_config_of_a_plugin_without_config_changed_hook_reloads_it(
    api: ApiServer,
) -> None:
    code = route_plugin("zpa_cfg2", "1").replace(
        'return JSONResponse({"version": VERSION})',
        'return JSONResponse({"version": VERSION, "config": dict(CTX[\'ctx\'].config)})',
    ) + (
        "\nCTX = {}\n@hookimpl\nasync def nekobot_plugin_start(ctx):\n"
        "    if ctx.config.get('fail'):\n        raise RuntimeError('refuses this config')\n"
        "    CTX['ctx'] = ctx\n"
    )
    schema = {
        "type": "object",
        "properties": {"fail": {"type": "boolean"}, "n": {"type": "integer"}},
    }
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_cfg2", code, {"config_schema": schema})
        r = await c.put("/api/plugins/config", json={"name": "zpa_cfg2", "config": {"n": 1}})
        assert r.status_code == 200, r.text
        assert (await c.get("/api/zpa_cfg2/show")).json()["config"] == {"n": 1}
        # A configuration the plugin refuses to start with: 422, the old one keeps serving,
        # and nothing is stored (it would break the next start).
        r = await c.put(
            "/api/plugins/config", json={"name": "zpa_cfg2", "config": {"n": 2, "fail": True}}
        )
        assert_error(r, 422)
        assert (await c.get("/api/zpa_cfg2/show")).json()["config"] == {"n": 1}
        got = (await c.get("/api/plugins/config", params={"name": "zpa_cfg2"})).json()["data"]
        assert got["config"] == {"n": 1}
        assert await api.kernel.storage.state_get("plugin_config", "zpa_cfg2", None) == {"n": 1}


async def test_swaps_while_requests_are_in_flight(api: ApiServer) -> None:
    """Enable, disable and reload the plugin that owns a route while ~50 requests to it
    are in flight: each gets 200 (some generation) or 404 (disabled), never 5xx or a hang."""
    written = [1]
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_slow", SLOW_PLUGIN.format(gen=1))
        results: list[tuple[int, Any]] = []

        # Timing only spreads the requests and swaps out (waiting for nothing): every
        # outcome of their interleaving is checked below.
        async def call(delay: float) -> None:
            await anyio.sleep(delay)
            r = await c.get("/api/zpa_slow/work")
            assert "Traceback" not in r.text
            results.append((r.status_code, r.json()))

        async def toggle() -> None:
            for step in range(3):
                await anyio.sleep(0.1)
                r = await c.post("/api/plugins/disable", json={"name": "zpa_slow"})
                assert r.status_code == 200, r.text
                await anyio.sleep(0.1)
                r = await c.post("/api/plugins/enable", json={"name": "zpa_slow"})
                assert r.status_code == 200, r.text
                await anyio.sleep(0.05)
                written.append(step + 2)
                write_plugin(api.plugin_dir, "zpa_slow", SLOW_PLUGIN.format(gen=step + 2))
                r = await c.post("/api/plugins/reload", json={"name": "zpa_slow"})
                assert r.status_code == 200, r.text

        with anyio.fail_after(PATIENCE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(toggle)
                for i in range(50):
                    tg.start_soon(call, i * 0.02)
        assert len(results) == 50
        statuses = {status for status, _ in results}
        assert statuses <= {200, 404}, results
        assert 200 in statuses
        for status, body in results:
            if status == 200:
                assert body["gen"] in written
            else:
                assert body["code"] == "not_found"
        # Afterwards the route is the newest generation's.
        r = await c.get("/api/zpa_slow/work")
        assert r.status_code == 200 and r.json() == {"gen": written[-1]}
        await c.post("/api/plugins/disable", json={"name": "zpa_slow"})
        assert_error(await c.get("/api/zpa_slow/work"), 404)
    assert api.kernel.plugins.records["zpa_slow"].state is PluginState.DISPOSED


async def test_config_errors_never_echo_a_secret(api: ApiServer, caplog: Any) -> None:
    key = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e"
    schema = {
        "type": "object",
        "maxProperties": 2,
        "properties": {
            "api_key": {"type": "string", "writeOnly": True, "pattern": "^sk-"},
            "model": {"type": "string"},
            "extra": {"type": "string"},
        },
    }
    async with api.authed() as c:
        await add_plugin(api, c, "zpa_sec", "", {"config_schema": schema})
        r = await c.put("/api/plugins/config", json={"name": "zpa_sec", "config": {"api_key": key}})
        assert r.status_code == 200, r.text
        masked = r.json()["data"]["config"]["api_key"]
        # The masked key written back is swapped for the stored one before validation:
        # a rule about the whole object must not print the configuration that holds it.
        config = {"api_key": masked, "model": "m", "extra": "x"}
        r = await c.put("/api/plugins/config", json={"name": "zpa_sec", "config": config})
        assert_error(r, 400, "config")
        assert key not in r.text and "at most 2 properties" in r.text
        # A new secret that breaks its own rule is not printed either.
        wrong = "xk-live-0123456789abcdef0123"
        r = await c.put(
            "/api/plugins/config", json={"name": "zpa_sec", "config": {"api_key": wrong}}
        )
        assert_error(r, 400, "api_key")
        assert wrong not in r.text
        # A stored key the plugin's next version refuses: its start fails, naming the field.
        stricter = {**schema, "properties": {"api_key": {"type": "string", "pattern": "^sk-test-"}}}
        write_plugin(api.plugin_dir, "zpa_sec", "", manifest={"config_schema": stricter})
        r = await c.post("/api/plugins/reload", json={"name": "zpa_sec"})
        assert_error(r, 422)
        assert key not in r.text and "api_key" in r.text
        assert key not in str(await plugin(c, "zpa_sec"))
        logs = await c.get("/api/logs", params={"page_size": 100, "plugin": "zpa_sec"})
        assert logs.status_code == 200 and "api_key" in logs.text
    for text in (logs.text, *(r.message for r in api.kernel.logging.buffer.records)):
        assert key not in text and wrong not in text
    assert not [r for r in caplog.records if key in r.getMessage() or wrong in r.getMessage()]
