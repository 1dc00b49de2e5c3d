"""Tests of kernel.loader: discovery, manifests, and fresh imports of directory plugins."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from kernel import PluginLoadError, PluginSource, PluginState, ReloadError
from kernel.loader import ModuleLoader, discover_directory, shadows_module
from kernel.testing import MockBot, running_kernel
from tests.plugin_factory import purge_modules, write_plugin

VERSIONED = """
from kernel import CommandSpec, hookimpl
from . import helpers
from .helpers import tag

async def which(cmd):
    return tag() + " " + helpers.VERSION

@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", which)]
"""

HELPERS = """
VERSION = "{version}"

def tag():
    return "tag-{version}"
"""


def versioned(root: Path, name: str, command: str, version: str) -> Path:
    return write_plugin(
        root,
        name,
        VERSIONED.format(command=command),
        files={"helpers.py": HELPERS.format(version=version)},
    )


@pytest.mark.anyio
async def test_each_generation_gets_fresh_module_objects(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    versioned(plugins, "ld_fresh", "ld_fresh", "v1")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/ld_fresh") == ["tag-v1 v1"]
        first, first_sub = sys.modules["ld_fresh"], sys.modules["ld_fresh.helpers"]
        assert first.__file__ == str(plugins / "ld_fresh" / "__init__.py")

        await kernel.plugins.reload("ld_fresh")  # unchanged files: still new objects
        second, second_sub = sys.modules["ld_fresh"], sys.modules["ld_fresh.helpers"]
        assert second is not first and id(second) != id(first)
        assert second_sub is not first_sub
        assert second.helpers is second_sub  # the package sees its own submodule
        assert kernel.plugins.records["ld_fresh"].generation.imported.module is second  # type: ignore[union-attr]

        # An edited submodule is picked up on reload.
        versioned(plugins, "ld_fresh", "ld_fresh", "v2")
        await kernel.plugins.reload("ld_fresh")
        assert await bot.receive("/ld_fresh") == ["tag-v2 v2"]
    assert "ld_fresh" not in sys.modules
    assert "ld_fresh.helpers" not in sys.modules


@pytest.mark.anyio
async def test_no_bytecode_written_nor_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    plugins = tmp_path / "plugins"
    path = versioned(plugins, "ld_nopyc", "ld_nopyc", "v1")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/ld_nopyc") == ["tag-v1 v1"]
        stat = (path / "helpers.py").stat()
        # Same size and same mtime: a bytecode cache would hide this edit.
        versioned(plugins, "ld_nopyc", "ld_nopyc", "v9")
        os.utime(path / "helpers.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        await kernel.plugins.reload("ld_nopyc")
        assert await bot.receive("/ld_nopyc") == ["tag-v9 v9"]
    assert not list(path.rglob("*.pyc"))
    assert not (path / "__pycache__").exists()


@pytest.mark.anyio
async def test_plugin_shadowing_a_stdlib_module_fails_clearly(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "json", "raise AssertionError('must never be imported')\n")
    write_plugin(plugins, "anyio", "raise AssertionError('must never be imported')\n")
    real_json = sys.modules["json"]
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        for name in ("json", "anyio"):
            info = kernel.plugins.info(name)
            assert info.state is PluginState.FAILED
            assert info.error is not None
            assert "shadow" in info.error and repr(name) in info.error
            with pytest.raises(PluginLoadError, match="shadow"):
                await kernel.plugins.enable(name)
            with pytest.raises(ReloadError, match="shadow"):
                await kernel.plugins.reload(name)
        assert sys.modules["json"] is real_json
        assert json.dumps({"a": 1}) == '{"a": 1}'
    assert sys.modules["json"] is real_json
    assert shadows_module("json") and shadows_module("pytest")
    assert not shadows_module("ld_surely_not_a_module")


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        ('name = "ld_bad"\nversion = "not a version"\n', "version"),
        ('name = "ld_bad"\n', "version"),
        ('version = "1.0"\n', "name"),
        ('name = "ld_bad"\nversion = "1.0"\ncolour = "blue"\n', "colour"),
        ('name = "ld_bad"\nversion = "1.0"\nnekobot = "bananas"\n', "nekobot"),
        ('name = "ld_bad"\nversion = "1.0"\ndependencies = "requests"\n', "dependencies"),
        ('name = "ld_bad"\nversion = "1.0"\nconfig_schema = {type = 5}\n', "config_schema"),
        ('name = "ld_bad"\nversion = "1.0\n', "plugin.toml"),
        ('name = "ld_other"\nversion = "1.0"\n', "name"),
    ],
)
def test_invalid_manifest_names_the_field(tmp_path: Path, manifest: str, field: str) -> None:
    write_plugin(tmp_path, "ld_bad", "", raw_manifest=manifest)
    [cand] = discover_directory(tmp_path)
    assert cand.name == "ld_bad"
    assert cand.manifest is None
    assert cand.problem is not None
    assert f"manifest field {field!r}" in cand.problem


@pytest.mark.anyio
async def test_invalid_manifest_and_name_mismatch_are_reported(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "ld_badver", "", manifest={"version": "one point oh"})
    write_plugin(plugins, "ld_dir", "", raw_manifest='name = "ld_manifest"\nversion = "1.0"\n')
    write_plugin(plugins, "ld_good", "", manifest={"nekobot": ">=999"})
    (plugins / "ld_nomanifest").mkdir()
    (plugins / "ld_nomanifest" / "__init__.py").write_text("")
    (plugins / "Bad-Name").mkdir()
    (plugins / "Bad-Name" / "__init__.py").write_text("")
    (plugins / "ld_notapackage").mkdir()  # no __init__.py: not a plugin at all
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        infos = {i.name: i for i in kernel.plugins.infos()}
        assert set(infos) == {"ld_badver", "ld_dir", "ld_good", "ld_nomanifest", "Bad-Name"}
        assert all(i.state is PluginState.FAILED for i in infos.values())
        assert "manifest field 'version'" in (infos["ld_badver"].error or "")
        mismatch = infos["ld_dir"].error or ""
        assert "manifest field 'name'" in mismatch
        assert "'ld_manifest'" in mismatch and "'ld_dir'" in mismatch
        assert "ld_manifest" not in infos
        assert "manifest field 'nekobot'" in (infos["ld_good"].error or "")
        assert "plugin.toml" in (infos["ld_nomanifest"].error or "")
        assert "directory name" in (infos["Bad-Name"].error or "")
        with pytest.raises(PluginLoadError, match="differs from the directory name"):
            await kernel.plugins.enable("ld_dir")


def test_module_loader_rolls_back_a_failed_fresh_import(tmp_path: Path) -> None:
    purge_modules("ld_unit")
    versioned(tmp_path, "ld_unit", "ld_unit", "v1")
    [cand] = discover_directory(tmp_path)
    assert cand.source is PluginSource.USER and cand.problem is None
    loader = ModuleLoader()
    loader.install()
    try:
        first = loader.import_plugin(cand, fresh=True)
        first.commit()
        assert sys.modules["ld_unit"] is first.module
        old_sub = sys.modules["ld_unit.helpers"]

        (tmp_path / "ld_unit" / "helpers.py").write_text("raise ImportError('broken helper')\n")
        with pytest.raises(ImportError, match="broken helper"):
            loader.import_plugin(cand, fresh=True)
        # The failed import left the previous modules in place.
        assert sys.modules["ld_unit"] is first.module
        assert sys.modules["ld_unit.helpers"] is old_sub

        versioned(tmp_path, "ld_unit", "ld_unit", "v2")
        second = loader.import_plugin(cand, fresh=True)
        assert second.module is not first.module
        assert second.module.helpers.VERSION == "v2"
        second.rollback()  # staged but not committed: put the first generation back
        assert sys.modules["ld_unit"] is first.module
        assert sys.modules["ld_unit.helpers"] is old_sub

        loader.forget(cand)
        assert "ld_unit" not in sys.modules and "ld_unit.helpers" not in sys.modules
        assert "ld_unit" not in loader.finder.roots
    finally:
        loader.uninstall()
        purge_modules("ld_unit")
    assert loader.finder not in sys.meta_path


def test_discovery_ignores_hidden_and_private_directories(tmp_path: Path) -> None:
    write_plugin(tmp_path, "ld_visible", "")
    write_plugin(tmp_path, "_ld_private", "", raw_manifest='name = "x"\n')
    write_plugin(tmp_path, ".ld_hidden", "", raw_manifest='name = "x"\n')
    (tmp_path / "stray.py").write_text("")
    assert [c.name for c in discover_directory(tmp_path)] == ["ld_visible"]
    assert discover_directory(tmp_path / "missing") == []


@pytest.mark.anyio
async def test_a_plugin_calling_sys_exit_at_import_is_a_load_error(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "ld_exits", "import sys\nsys.exit(3)\n")
    write_plugin(plugins, "ld_fine", "")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        info = kernel.plugins.info("ld_exits")
        assert info.state is PluginState.FAILED
        assert "SystemExit" in (info.error or "")
        assert kernel.plugins.info("ld_fine").state is PluginState.ACTIVE
        with pytest.raises(PluginLoadError, match="SystemExit"):
            await kernel.plugins.reload("ld_exits")


# -- builtins are registered, never imported by name ----------------------------------


def test_no_kernel_module_imports_a_plugin() -> None:
    """No import statement in `kernel/`, at any depth, names `builtin_plugins`."""
    import ast

    kernel_dir = Path(__file__).resolve().parents[2] / "kernel"
    offenders = []
    for path in sorted(kernel_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.startswith("builtin")]
    assert offenders == []


def test_a_kernel_with_no_builtins_never_imports_the_builtin_package(tmp_path: Path) -> None:
    """A kernel given its builtins explicitly (none here) runs without `builtin_plugins`."""
    import subprocess

    code = (
        "import sys, anyio\n"
        "from kernel import Kernel, KernelConfig\n"
        "async def main():\n"
        "    config = KernelConfig(data_dir='data', plugin_dirs=(), builtins=(),\n"
        "                          entry_points=False, hot_reload=False, watchdog=False)\n"
        "    async with Kernel(config) as k:\n"
        "        assert k.plugins.records == {}\n"
        "anyio.run(main)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'builtin_plugins'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]"


def test_the_distribution_registers_its_builtins() -> None:
    from kernel.loader import registered_builtins

    builtins = {b.name: b for b in registered_builtins()}
    assert {"api", "auth", "plugin_admin", "help"} <= set(builtins)
    assert builtins["api"].essential and not builtins["help"].essential
    assert builtins["help"].module == "builtin_plugins.help"


@pytest.mark.anyio
async def test_an_application_passes_its_own_builtins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel import BuiltinPlugin

    package = write_plugin(
        tmp_path / "site",
        "appx_core",
        """
        from kernel import CommandSpec, hookimpl

        async def ping(cmd):
            return "pong from the app"

        @hookimpl
        def nekobot_commands():
            return [CommandSpec("appping", ping)]
        """,
    )
    monkeypatch.syspath_prepend(str(package.parent))
    purge_modules("appx_core")
    builtins = (BuiltinPlugin("appx_core", "appx_core", essential=True),)
    try:
        async with running_kernel(tmp_path / "data", builtins=builtins, builtin_plugins=None) as k:
            info = k.plugins.info("appx_core")
            assert info.source is PluginSource.BUILTIN and info.essential
            assert info.state is PluginState.ACTIVE
            assert await MockBot(k).receive("/appping") == ["pong from the app"]
            assert "api" not in k.plugins.records  # only what the application passed
    finally:
        purge_modules("appx_core")


@pytest.mark.anyio
async def test_a_selected_builtin_that_is_not_registered_fails_clearly(tmp_path: Path) -> None:
    async with running_kernel(tmp_path, builtin_plugins=["help", "no_such_builtin"]) as k:
        info = k.plugins.info("no_such_builtin")
        assert info.state is PluginState.FAILED
        assert info.error == "no builtin plugin 'no_such_builtin' is registered"
        assert k.plugins.info("help").state is PluginState.ACTIVE


@pytest.mark.anyio
async def test_a_failed_import_logs_the_plugins_own_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins, "ld_raises", "def helper():\n    raise ValueError('bad at import')\n\nhelper()\n"
    )
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins]) as kernel:
        assert kernel.plugins.info("ld_raises").state is PluginState.FAILED
    [record] = [r for r in caplog.records if "loading plugin 'ld_raises' failed" in r.message]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    text = logging.Formatter().formatException(record.exc_info)
    assert "ld_raises" in text and "in helper" in text
