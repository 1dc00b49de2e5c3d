"""Tests of kernel.manager: enable/disable/reload/delete of every kind of plugin,
persistence across restarts, and plugin configuration."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kernel import (
    ConfigError,
    EssentialPluginError,
    Kernel,
    KernelConfig,
    PluginLoadError,
    PluginNotFoundError,
    PluginSource,
    PluginState,
)
from kernel.testing import MockBot, running_kernel
from tests.plugin_factory import purge_modules, write_distribution, write_plugin

GREETER = """
from kernel import CommandSpec, hookimpl

async def greet(cmd):
    return f"{{cmd.ctx.config.get('greeting', 'hi')}} from {tag}"

@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", greet)]
"""


def greeter(command: str, tag: str = "v1") -> str:
    return GREETER.format(command=command, tag=tag)


# ------------------------------------------------------------------ builtin plugins


@pytest.mark.anyio
async def test_builtin_help_enable_disable_reload(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data", builtin_plugins=["api", "help"]) as kernel:
        bot = MockBot(kernel)
        info = kernel.plugins.info("help")
        assert info.source is PluginSource.BUILTIN and info.state is PluginState.ACTIVE
        assert (await bot.receive("/help"))[0].startswith("Commands:")

        await kernel.plugins.disable("help")
        assert kernel.plugins.info("help").state is PluginState.DISPOSED
        assert await bot.receive("/help") == []
        # A builtin stays imported (its code changes only with a restart).
        assert "builtin_plugins.help" in sys.modules

        await kernel.plugins.enable("help")
        assert kernel.plugins.info("help").state is PluginState.ACTIVE
        assert (await bot.receive("/h"))[0].startswith("Commands:")

        before = kernel.plugins.records["help"].generation
        result = await kernel.plugins.reload("help")
        assert result.plugin.reload_count == 1
        assert kernel.plugins.records["help"].generation is not before
        assert (await bot.receive("/help"))[0].startswith("Commands:")

        with pytest.raises(EssentialPluginError):
            await kernel.plugins.delete("help")
        assert kernel.plugins.info("help").state is PluginState.ACTIVE


@pytest.mark.anyio
async def test_essential_api_refuses_disable_and_delete(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data", builtin_plugins=["api"]) as kernel:
        assert kernel.plugins.info("api").essential
        with pytest.raises(EssentialPluginError, match="essential"):
            await kernel.plugins.disable("api")
        with pytest.raises(EssentialPluginError):
            await kernel.plugins.delete("api")
        assert kernel.plugins.info("api").state is PluginState.ACTIVE
        assert kernel.plugins.info("api").enabled
        # Reloading it is fine.
        await kernel.plugins.reload("api")
        assert kernel.plugins.info("api").state is PluginState.ACTIVE
        assert kernel.routes.get(("/api/health", "GET")) is not None


@pytest.mark.anyio
async def test_unknown_plugin(tmp_path: Path) -> None:
    async with running_kernel(tmp_path / "data") as kernel:
        for op in (kernel.plugins.enable, kernel.plugins.disable, kernel.plugins.reload):
            with pytest.raises(PluginNotFoundError):
                await op("mgr_nobody")
        with pytest.raises(PluginNotFoundError):
            await kernel.plugins.delete("mgr_nobody")


# ------------------------------------------------------------------ directory plugins

DATAFUL = """
from kernel import CommandSpec, hookimpl

async def show(cmd):
    return str(await cmd.ctx.store.kv_get("visits", 0))

@hookimpl
def nekobot_commands():
    return [CommandSpec("mgr_visits", show)]

@hookimpl
async def nekobot_plugin_start(ctx):
    await ctx.store.kv_set("visits", await ctx.store.kv_get("visits", 0) + 1)
    (ctx.data_dir / "notes.txt").write_text("kept")
"""


@pytest.mark.anyio
async def test_directory_plugin_enable_disable_reload_delete(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "mgr_dir", DATAFUL)
    data = tmp_path / "data"
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        info = kernel.plugins.info("mgr_dir")
        assert info.source is PluginSource.USER and info.state is PluginState.ACTIVE
        assert info.path == str(path)
        assert await bot.receive("/mgr_visits") == ["1"]

        await kernel.plugins.disable("mgr_dir")
        assert "mgr_dir" not in sys.modules
        assert await bot.receive("/mgr_visits") == []
        await kernel.plugins.enable("mgr_dir")
        assert await bot.receive("/mgr_visits") == ["2"]
        await kernel.plugins.reload("mgr_dir")
        assert await bot.receive("/mgr_visits") == ["3"]
        await kernel.plugins.set_config("mgr_dir", {})
        assert (data / "plugin_data" / "mgr_dir" / "notes.txt").is_file()

        result = await kernel.plugins.delete("mgr_dir")

        assert result.plugin.state is PluginState.DISPOSED
        assert not path.exists()
        assert "mgr_dir" not in kernel.plugins.records
        with pytest.raises(PluginNotFoundError):
            kernel.plugins.info("mgr_dir")
        assert await bot.receive("/mgr_visits") == []
        assert "mgr_dir" not in sys.modules
        assert await kernel.storage.plugin_store("mgr_dir").kv_items() == {}
        assert await kernel.storage.state_get("plugin_config", "mgr_dir") is None
        assert await kernel.storage.state_get("plugins", "mgr_dir") is None
        assert not (data / "plugin_data" / "mgr_dir").exists()


@pytest.mark.anyio
async def test_delete_keep_data(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "mgr_keep", DATAFUL.replace("mgr_visits", "mgr_keep_visits"))
    data = tmp_path / "data"
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await kernel.plugins.set_config("mgr_keep", {"anything": 1})
        await kernel.plugins.delete("mgr_keep", keep_data=True)
        assert not path.exists()
        assert await kernel.storage.plugin_store("mgr_keep").kv_items() == {"visits": 2}
        assert await kernel.storage.state_get("plugin_config", "mgr_keep") == {"anything": 1}
        assert (data / "plugin_data" / "mgr_keep" / "notes.txt").is_file()

    # Reinstalled, the plugin finds its data again.
    write_plugin(plugins, "mgr_keep", DATAFUL.replace("mgr_visits", "mgr_keep_visits"))
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        assert await MockBot(kernel).receive("/mgr_keep_visits") == ["3"]


@pytest.mark.anyio
async def test_disabled_plugin_can_be_deleted(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    path = write_plugin(plugins, "mgr_off", greeter("mgr_off_cmd"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        await kernel.plugins.disable("mgr_off")
        await kernel.plugins.delete("mgr_off")
        assert not path.exists()
        assert "mgr_off" not in kernel.plugins.records


# ------------------------------------------------------------------ entry-point plugins


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path that holds fake installed distributions."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    # Edits below must not be masked by a bytecode cache written within the same second.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield path
    purge_modules("mgr_ep")
    purge_modules("mgr_ep_pkg")


@pytest.mark.anyio
async def test_entry_point_plugin_lifecycle(tmp_path: Path, site: Path) -> None:
    package = write_distribution(
        site, "nekobot_mgr_ep", "mgr_ep", greeter("mgr_ep_cmd"), module="mgr_ep_pkg"
    )
    async with running_kernel(tmp_path / "data", entry_points=True) as kernel:
        bot = MockBot(kernel)
        info = kernel.plugins.info("mgr_ep")
        assert info.source is PluginSource.ENTRYPOINT
        assert info.state is PluginState.ACTIVE, info.error
        assert info.version == "1.0"
        assert await bot.receive("/mgr_ep_cmd") == ["hi from v1"]

        await kernel.plugins.disable("mgr_ep")
        assert kernel.plugins.info("mgr_ep").state is PluginState.DISPOSED
        assert await bot.receive("/mgr_ep_cmd") == []
        assert "mgr_ep_pkg" not in sys.modules

        await kernel.plugins.enable("mgr_ep")
        assert await bot.receive("/mgr_ep_cmd") == ["hi from v1"]

        (package / "__init__.py").write_text(greeter("mgr_ep_cmd", tag="version two"))
        await kernel.plugins.reload("mgr_ep")
        assert await bot.receive("/mgr_ep_cmd") == ["hi from version two"]

        with pytest.raises(EssentialPluginError, match="only user plugins"):
            await kernel.plugins.delete("mgr_ep")
        assert package.is_dir()
        assert kernel.plugins.info("mgr_ep").state is PluginState.ACTIVE


@pytest.mark.anyio
async def test_entry_point_plugin_without_manifest_uses_metadata(
    tmp_path: Path, site: Path
) -> None:
    write_distribution(site, "nekobot_mgr_ep", "mgr_ep", greeter("mgr_ep2"), with_manifest=False)
    # Entry points are on by default for a Kernel built directly.
    config = KernelConfig(
        data_dir=tmp_path / "data",
        plugin_dirs=(),
        builtin_plugins=(),
        hot_reload=False,
        watchdog=False,
    )
    async with Kernel(config) as kernel:
        info = kernel.plugins.info("mgr_ep")
        assert info.state is PluginState.ACTIVE, info.error
        assert info.description == "test plugin mgr_ep"
        assert await MockBot(kernel).receive("/mgr_ep2") == ["hi from v1"]


# ------------------------------------------------------------------ persistence and config

SCHEMA = {
    "type": "object",
    "properties": {
        "greeting": {"type": "string", "default": "hello"},
        "times": {"type": "integer", "minimum": 1, "default": 1},
    },
    "additionalProperties": False,
}


@pytest.mark.anyio
async def test_restart_restores_enabled_set_and_config(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "mgr_p_on", greeter("mgr_on"), manifest={"config_schema": SCHEMA})
    write_plugin(plugins, "mgr_p_off", greeter("mgr_off"))
    data = tmp_path / "data"
    options = {"plugin_dirs": [plugins], "builtin_plugins": ["api", "help"]}
    async with running_kernel(data, **options) as kernel:  # type: ignore[arg-type]
        bot = MockBot(kernel)
        assert await bot.receive("/mgr_on") == ["hello from v1"]
        assert await kernel.plugins.get_config("mgr_p_on") == {"greeting": "hello", "times": 1}
        full = await kernel.plugins.set_config("mgr_p_on", {"greeting": "hey"})
        assert full == {"greeting": "hey", "times": 1}
        # A plugin without nekobot_config_changed is reloaded to apply its config.
        assert await bot.receive("/mgr_on") == ["hey from v1"]
        await kernel.plugins.disable("mgr_p_off")
        await kernel.plugins.disable("help")

    async with running_kernel(data, **options) as kernel:  # type: ignore[arg-type]
        states = {i.name: (i.enabled, i.state) for i in kernel.plugins.infos()}
        assert states == {
            "api": (True, PluginState.ACTIVE),
            "help": (False, PluginState.PENDING),
            "mgr_p_on": (True, PluginState.ACTIVE),
            "mgr_p_off": (False, PluginState.PENDING),
        }
        assert await kernel.plugins.get_config("mgr_p_on") == {"greeting": "hey", "times": 1}
        bot = MockBot(kernel)
        assert await bot.receive("/mgr_on") == ["hey from v1"]
        assert await bot.receive("/mgr_off") == []
        await kernel.plugins.enable("mgr_p_off")
        await kernel.plugins.disable("mgr_p_on")

    async with running_kernel(data, **options) as kernel:  # type: ignore[arg-type]
        assert not kernel.plugins.info("mgr_p_on").enabled
        assert kernel.plugins.info("mgr_p_off").state is PluginState.ACTIVE
        # The config survives being disabled.
        assert await kernel.plugins.get_config("mgr_p_on") == {"greeting": "hey", "times": 1}


@pytest.mark.anyio
async def test_set_config_validation_names_the_field(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "mgr_cfg", greeter("mgr_cfg"), manifest={"config_schema": SCHEMA})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        with pytest.raises(ConfigError) as caught:
            await kernel.plugins.set_config("mgr_cfg", {"times": 0})
        assert caught.value.field == "times"
        with pytest.raises(ConfigError) as caught:
            await kernel.plugins.set_config("mgr_cfg", {"greeting": 42})
        assert caught.value.field == "greeting"
        with pytest.raises(ConfigError):
            await kernel.plugins.set_config("mgr_cfg", {"nonsense": True})
        # Nothing invalid was stored or applied.
        assert await kernel.storage.state_get("plugin_config", "mgr_cfg") is None
        assert await MockBot(kernel).receive("/mgr_cfg") == ["hello from v1"]
        assert kernel.plugins.config_schema("mgr_cfg") == SCHEMA


LIVE_CONFIG = """
from kernel import CommandSpec, hookimpl

async def greet(cmd):
    return cmd.ctx.config["greeting"]

@hookimpl
def nekobot_commands():
    return [CommandSpec("mgr_live", greet)]

@hookimpl
def nekobot_config_schema():
    return {"type": "object", "properties": {"greeting": {"type": "string", "default": "a"}}}

@hookimpl
async def nekobot_config_changed(ctx, config):
    ctx.services.current(list).append(dict(config))
"""


@pytest.mark.anyio
async def test_config_changed_hook_applies_config_live(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "mgr_live", LIVE_CONFIG)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        changes: list[dict[str, str]] = []
        kernel.services.provide("tests", list, changes)
        gen = kernel.plugins.records["mgr_live"].generation
        bot = MockBot(kernel)
        assert await bot.receive("/mgr_live") == ["a"]
        await kernel.plugins.set_config("mgr_live", {"greeting": "b"})
        assert changes == [{"greeting": "b"}]
        assert kernel.plugins.records["mgr_live"].generation is gen  # no reload
        assert await bot.receive("/mgr_live") == ["b"]
        with pytest.raises(ConfigError) as caught:
            await kernel.plugins.set_config("mgr_live", {"greeting": ["x"]})
        assert caught.value.field == "greeting"


@pytest.mark.anyio
async def test_operations_on_one_plugin_are_serialized(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "mgr_serial", greeter("mgr_serial"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(kernel.plugins.reload, "mgr_serial")
                tg.start_soon(kernel.plugins.disable, "mgr_serial")
                tg.start_soon(kernel.plugins.enable, "mgr_serial")
        await kernel.plugins.enable("mgr_serial")
        assert kernel.plugins.info("mgr_serial").state is PluginState.ACTIVE
        assert len(kernel.commands.owned_by("mgr_serial")) == 1
        assert len([n for n, _ in kernel.plugins.pm.list_name_plugin() if "mgr_serial" in n]) == 1
        assert await MockBot(kernel).receive("/mgr_serial") == ["hi from v1"]


@pytest.mark.anyio
async def test_reload_of_a_disabled_plugin_loads_it_without_enabling(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "mgr_rel_off", greeter("mgr_rel_off"))
    data = tmp_path / "data"
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        await kernel.plugins.disable("mgr_rel_off")
        result = await kernel.plugins.reload("mgr_rel_off")
        assert result.plugin.state is PluginState.ACTIVE
        assert not result.plugin.enabled
        assert await MockBot(kernel).receive("/mgr_rel_off") == ["hi from v1"]
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        assert kernel.plugins.info("mgr_rel_off").state is PluginState.PENDING


PICKY = """
from kernel import CommandSpec, hookimpl

async def greet(cmd):
    return cmd.ctx.config["greeting"]

@hookimpl
def nekobot_commands():
    return [CommandSpec("mgr_picky", greet)]

@hookimpl
async def nekobot_plugin_start(ctx):
    if ctx.config["greeting"] == "boom":
        raise ValueError("greeting rejected")
"""


@pytest.mark.anyio
@pytest.mark.parametrize("configured", [True, False])
async def test_config_the_plugin_refuses_keeps_the_old_one(
    tmp_path: Path, configured: bool
) -> None:
    plugins = tmp_path / "plugins"
    schema = {"type": "object", "properties": {"greeting": {"type": "string", "default": "a"}}}
    write_plugin(plugins, "mgr_picky", PICKY, manifest={"config_schema": schema})
    data = tmp_path / "data"
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        if configured:
            await kernel.plugins.set_config("mgr_picky", {"greeting": "b"})
        expected = "b" if configured else "a"
        assert await bot.receive("/mgr_picky") == [expected]

        serving = kernel.plugins.records["mgr_picky"].generation
        assert serving is not None
        with pytest.raises(PluginLoadError, match="greeting rejected"):
            await kernel.plugins.set_config("mgr_picky", {"greeting": "boom"})

        assert kernel.plugins.info("mgr_picky").state is PluginState.ACTIVE
        # The previous generation itself is back (its module state kept), started with
        # the configuration it ran with: not a fresh import after a second refusal.
        restored = kernel.plugins.records["mgr_picky"].generation
        assert restored is not None and restored.number == serving.number
        starts = [r for r in kernel.logging.buffer.records if "raised ValueError" in r.message]
        assert len(starts) == 1
        assert await bot.receive("/mgr_picky") == [expected]
        assert await kernel.plugins.get_config("mgr_picky") == {"greeting": expected}
        stored = await kernel.storage.state_get("plugin_config", "mgr_picky")
        assert stored == ({"greeting": "b"} if configured else None)
    async with running_kernel(data, plugin_dirs=[plugins]) as kernel:
        assert await MockBot(kernel).receive("/mgr_picky") == [expected]
