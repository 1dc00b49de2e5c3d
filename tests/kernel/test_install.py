"""Tests of kernel.install: installing plugin archives into a running kernel, dry runs,
transactional overwrite, and the malicious-archive corpus leaving nothing behind."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from kernel import (
    InstallError,
    ManifestError,
    PluginExistsError,
    PluginLoadError,
    PluginState,
    ReloadError,
)
from kernel.archive import STAGING_PREFIX, ArchiveLimits
from kernel.install import install_archive
from kernel.testing import PATIENCE, MockBot, running_kernel
from tests.kernel.test_archive import MALICIOUS, make_zip
from tests.plugin_factory import manifest_text, purge_modules, write_plugin

PREFIX = "zz_inst_"

COMMAND = """
from kernel import CommandSpec, hookimpl

async def answer(cmd):
    return "{reply}"

@hookimpl
def nekobot_commands():
    return [CommandSpec("{command}", answer)]
"""

FAILS_TO_START = (
    COMMAND
    + """
@hookimpl
async def nekobot_plugin_start(ctx):
    raise RuntimeError("cannot start")
"""
)


def code(command: str, reply: str) -> str:
    return COMMAND.format(command=command, reply=reply)


def archive(
    name: str,
    source: str,
    *,
    manifest: dict[str, object] | None = None,
    files: dict[str, str] | None = None,
) -> bytes:
    entries: list[tuple[str, bytes]] = [
        (f"{name}/__init__.py", source.encode()),
        (f"{name}/plugin.toml", manifest_text(name, manifest).encode()),
    ]
    entries.extend((f"{name}/{rel}", text.encode()) for rel, text in (files or {}).items())
    return make_zip(entries)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _forget_plugin_modules() -> Iterator[None]:
    yield
    for module in [m for m in sys.modules if m.startswith(PREFIX)]:
        purge_modules(module)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "plugins"
    path.mkdir()
    return path


# ------------------------------------------------------------------ installing


@pytest.mark.anyio
async def test_install_and_enable_then_the_command_answers(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}echo"
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        bot = MockBot(kernel)
        result = await install_archive(
            kernel,
            archive(name, code("zzecho", "meow"), files={"util/__init__.py": "X = 1\n"}),
            enable=True,
        )
        assert result.installed and result.enabled and not result.dry_run
        assert not result.replaced and result.conflicts == ()
        assert result.name == name and result.manifest.version == "1.0"
        assert result.plugin is not None and result.plugin.state is PluginState.ACTIVE
        assert result.plugin.commands == (f"{name}:zzecho",)
        assert await bot.receive("/zzecho") == ["meow"]
        assert (plugin_dir / name / "util" / "__init__.py").read_text() == "X = 1\n"
        assert names(plugin_dir) == [name]


@pytest.mark.anyio
async def test_install_without_enable_stays_disabled_across_restarts(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}quiet"
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        result = await install_archive(kernel, archive(name, code("zzquiet", "shh")))
        assert result.installed and not result.enabled
        assert result.plugin is not None and not result.plugin.enabled
        assert await MockBot(kernel).receive("/zzquiet") == []
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        info = kernel.plugins.info(name)
        assert not info.enabled and info.state is not PluginState.ACTIVE
        await kernel.plugins.enable(name)
        assert await MockBot(kernel).receive("/zzquiet") == ["shh"]


@pytest.mark.anyio
async def test_install_into_a_missing_plugin_directory(tmp_path: Path) -> None:
    plugin_dir = tmp_path / "not" / "yet"
    name = f"{PREFIX}fresh"
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        await install_archive(kernel, archive(name, code("zzfresh", "new")), enable=True)
        assert await MockBot(kernel).receive("/zzfresh") == ["new"]
    assert names(plugin_dir) == [name]


@pytest.mark.anyio
async def test_archive_made_by_shutil_installs(tmp_path: Path, plugin_dir: Path) -> None:
    # Real archivers add directory entries and Unix modes; those must pass.
    name = f"{PREFIX}shutil"
    write_plugin(
        tmp_path / "src", name, code("zzshutil", "made"), files={"sub/helpers.py": "Y = 1\n"}
    )
    made = make_archive(tmp_path / "src", name)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        await install_archive(kernel, made, enable=True)
        assert await MockBot(kernel).receive("/zzshutil") == ["made"]


def make_archive(root: Path, name: str) -> bytes:
    base = shutil.make_archive(str(root.parent / "made"), "zip", root_dir=root, base_dir=name)
    return Path(base).read_bytes()


# ------------------------------------------------------------------ dry run


@pytest.mark.anyio
async def test_dry_run_reports_conflicts_and_writes_nothing(
    tmp_path: Path, plugin_dir: Path
) -> None:
    first, second = f"{PREFIX}first", f"{PREFIX}second"
    write_plugin(plugin_dir, first, code("zzping", "first"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        before = listing(plugin_dir)
        result = await install_archive(
            kernel, archive(second, code("zzping", "second")), dry_run=True, enable=True
        )
        assert result.dry_run and not result.installed and not result.enabled
        assert result.plugin is None and not result.replaced
        assert len(result.conflicts) == 1
        conflict = result.conflicts[0]
        assert conflict.key == "zzping" and conflict.holder == first
        assert {p for p, _ in conflict.candidates} == {first, second}
        assert listing(plugin_dir) == before
        assert second not in kernel.plugins.records
        assert second not in sys.modules
        assert await MockBot(kernel).receive("/zzping") == ["first"]


@pytest.mark.anyio
async def test_dry_run_of_a_running_plugin_does_not_disturb_it(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}live"
    write_plugin(plugin_dir, name, code("zzlive", "v1"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        bot = MockBot(kernel)
        module = sys.modules[name]
        root = kernel.loader.finder.roots[name]
        files = tree(plugin_dir)
        result = await install_archive(
            kernel, archive(name, code("zzlive", "v2")), overwrite=True, dry_run=True
        )
        assert result.dry_run and result.replaced and result.conflicts == ()
        assert result.plugin is not None and result.plugin.state is PluginState.ACTIVE
        assert sys.modules[name] is module
        assert kernel.loader.finder.roots[name] == root
        assert tree(plugin_dir) == files
        assert await bot.receive("/zzlive") == ["v1"]


@pytest.mark.anyio
async def test_dry_run_reports_a_plugin_that_does_not_import(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}broken_dry"
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        with pytest.raises(PluginLoadError, match="ZeroDivisionError"):
            await install_archive(kernel, archive(name, "1 / 0\n"), dry_run=True)
        assert listing(plugin_dir) == []
        assert name not in sys.modules


# ------------------------------------------------------------------ overwrite


@pytest.mark.anyio
async def test_overwrite_of_an_active_plugin_swaps_it(tmp_path: Path, plugin_dir: Path) -> None:
    name = f"{PREFIX}swap"
    write_plugin(plugin_dir, name, code("zzswap", "v1"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        bot = MockBot(kernel)
        assert await bot.receive("/zzswap") == ["v1"]
        with pytest.raises(InstallError, match="already installed"):
            await install_archive(kernel, archive(name, code("zzswap", "v2")))
        result = await install_archive(
            kernel, archive(name, code("zzswap", "v2"), manifest={"version": "2.0"}), overwrite=True
        )
        assert result.replaced and result.enabled and result.plugin is not None
        assert result.plugin.version == "2.0"
        assert await bot.receive("/zzswap") == ["v2"]
        assert names(plugin_dir) == [name]


@pytest.mark.anyio
async def test_overwrite_with_a_version_that_fails_to_start_keeps_the_old_one(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}keep"
    write_plugin(plugin_dir, name, code("zzkeep", "old"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        bot = MockBot(kernel)
        files = tree(plugin_dir)
        broken = FAILS_TO_START.format(command="zzkeep", reply="new")
        with pytest.raises(ReloadError, match="cannot start"):
            await install_archive(kernel, archive(name, broken), overwrite=True)
        assert tree(plugin_dir) == files
        assert kernel.plugins.info(name).state is PluginState.ACTIVE
        assert await bot.receive("/zzkeep") == ["old"]
        # The old files are what is loaded again: a reload still works.
        await kernel.plugins.reload(name)
        assert await bot.receive("/zzkeep") == ["old"]


@pytest.mark.anyio
async def test_overwrite_with_a_version_that_does_not_import_changes_nothing(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}noimport"
    write_plugin(plugin_dir, name, code("zznoimport", "old"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        bot = MockBot(kernel)
        module = sys.modules[name]
        files = tree(plugin_dir)
        with pytest.raises(PluginLoadError, match="SyntaxError"):
            await install_archive(kernel, archive(name, "def (:\n"), overwrite=True)
        assert tree(plugin_dir) == files
        assert sys.modules[name] is module
        assert await bot.receive("/zznoimport") == ["old"]


@pytest.mark.anyio
async def test_overwrite_of_a_disabled_plugin_keeps_it_disabled(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}off"
    write_plugin(plugin_dir, name, code("zzoff", "v1"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        await kernel.plugins.disable(name)
        result = await install_archive(
            kernel, archive(name, code("zzoff", "v2"), manifest={"version": "2.0"}), overwrite=True
        )
        assert result.replaced and not result.enabled
        assert kernel.plugins.info(name).version == "2.0"
        await kernel.plugins.enable(name)
        assert await MockBot(kernel).receive("/zzoff") == ["v2"]


# ------------------------------------------------------------------ refusals


@pytest.mark.anyio
async def test_failing_enable_after_install_leaves_nothing_behind(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}nostart"
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        data = archive(name, FAILS_TO_START.format(command="zznostart", reply="x"))
        with pytest.raises(PluginLoadError, match="cannot start"):
            await install_archive(kernel, data, enable=True)
        assert listing(plugin_dir) == []
        assert name not in kernel.plugins.records
        assert name not in sys.modules
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        assert name not in kernel.plugins.records


@pytest.mark.anyio
@pytest.mark.parametrize("stored", [None, {"enabled": True}])
@pytest.mark.parametrize("failing", ["_swap_in", "rescan"])
async def test_failed_install_restores_the_stored_enabled_flag(
    tmp_path: Path, plugin_dir: Path, monkeypatch: pytest.MonkeyPatch, failing: str, stored: object
) -> None:
    # A new plugin installed without `enable` is remembered as disabled before its files
    # move in; a failure must not leave that behind (a plugin of that name copied in
    # later would come up disabled).
    name = f"{PREFIX}flag"
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        if stored is not None:
            await kernel.storage.state_set("plugins", name, stored)

        def fail(*args: object) -> None:
            raise OSError("disk trouble")

        if failing == "_swap_in":
            monkeypatch.setattr("kernel.install._swap_in", fail)
        else:
            rescan = kernel.plugins.rescan

            async def rescan_fails_once() -> list[str]:
                monkeypatch.setattr(kernel.plugins, "rescan", rescan)
                fail()
                return []

            monkeypatch.setattr(kernel.plugins, "rescan", rescan_fails_once)
        with pytest.raises(OSError, match="disk trouble"):
            await install_archive(kernel, archive(name, code("zzflag", "x")))
        assert listing(plugin_dir) == []
        assert name not in kernel.plugins.records
        assert await kernel.storage.state_get("plugins", name) == stored


@pytest.mark.anyio
async def test_concurrent_installs_of_one_name_do_not_overwrite_each_other(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}race"
    outcomes: dict[str, str] = {}
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:

        async def install(reply: str) -> None:
            try:
                await install_archive(kernel, archive(name, code("zzrace", reply)), enable=True)
                outcomes[reply] = "installed"
            except PluginExistsError:
                outcomes[reply] = "refused"

        # Both pass the name check before either moves its files in.
        async with anyio.create_task_group() as tg:
            tg.start_soon(install, "a")
            tg.start_soon(install, "b")
        assert sorted(outcomes.values()) == ["installed", "refused"]
        winner = next(r for r, o in outcomes.items() if o == "installed")
        assert f'return "{winner}"' in (plugin_dir / name / "__init__.py").read_text()
        assert await MockBot(kernel).receive("/zzrace") == [winner]
        assert names(plugin_dir) == [name]


def test_a_plugin_moved_in_just_before_the_rename_is_an_exists_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the test above races through: another install renamed its files into
    place after this one's `lexists` looked, so the rename meets a non-empty directory."""
    import kernel.install as install

    staged = tmp_path / f"{STAGING_PREFIX}x" / "pkg"
    staged.mkdir(parents=True)
    (staged / "__init__.py").write_text("mine")
    target = tmp_path / "plugins" / f"{PREFIX}late"
    target.mkdir(parents=True)
    (target / "__init__.py").write_text("theirs")
    monkeypatch.setattr(install.os.path, "lexists", lambda path: False)
    with pytest.raises(PluginExistsError, match="already exists"):
        install._swap_in(staged, target, False)
    monkeypatch.undo()
    assert (target / "__init__.py").read_text() == "theirs"
    assert (staged / "__init__.py").read_text() == "mine"


@pytest.mark.anyio
async def test_name_of_a_builtin_or_a_module_is_refused(tmp_path: Path, plugin_dir: Path) -> None:
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugin_dir], builtin_plugins=["help"]
    ) as kernel:
        with pytest.raises(InstallError, match="taken by the builtin plugin"):
            await install_archive(kernel, archive("help", ""), overwrite=True)
        with pytest.raises(InstallError, match="shadow an importable module"):
            await install_archive(kernel, archive("json", ""))
        with pytest.raises(InstallError, match="shadow an importable module"):
            await install_archive(kernel, archive("pytest", ""))
        assert listing(plugin_dir) == []


@pytest.mark.anyio
async def test_dependencies_are_refused_while_pip_install_is_off(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}deps"
    data = archive(name, "", manifest={"dependencies": ["nekobot-surely-missing-dep>=2"]})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        with pytest.raises(InstallError, match="dependency installation is disabled"):
            await install_archive(kernel, data)
        assert listing(plugin_dir) == []


NEEDS_MISSING_DEP = """
import nekobot_surely_missing_dep

raise RuntimeError("a dry run must not import a package whose dependencies are missing")
"""


@pytest.mark.anyio
@pytest.mark.parametrize("pip_allowed", [False, True])
async def test_dry_run_with_missing_dependencies_does_not_import_and_reports_them(
    tmp_path: Path, plugin_dir: Path, pip_allowed: bool
) -> None:
    name = f"{PREFIX}deps_dry"
    deps = ["nekobot-surely-missing-dep>=2", "anyio>=1"]
    data = archive(name, NEEDS_MISSING_DEP, manifest={"dependencies": deps})
    # An empty wheelhouse: pip resolves nothing and reaches no index.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pip_args = ["--no-index", "--find-links", str(wheels)]
    async with running_kernel(
        tmp_path / "data", plugin_dirs=[plugin_dir], pip_args=pip_args
    ) as kernel:
        await kernel.update_settings(allow_pip_install=pip_allowed)
        result = await install_archive(kernel, data, dry_run=True, enable=True)
        assert result.dry_run and not result.installed and not result.enabled
        assert result.conflicts == () and result.registry_conflicts == ()
        assert result.conflicts_unknown is not None
        assert "nekobot-surely-missing-dep>=2" in result.conflicts_unknown
        status = result.dependencies
        assert status.requirements == tuple(deps)
        assert status.missing == ("nekobot-surely-missing-dep>=2",)
        assert status.pip_install_allowed is pip_allowed
        assert status.would_install == () and status.installed == ()
        assert status.problem is not None
        if pip_allowed:  # pip tried to resolve it and named the requirement
            assert "nekobot-surely-missing-dep>=2" in status.problem
        else:
            assert "allow_pip_install" in status.problem
        assert listing(plugin_dir) == []
        assert name not in kernel.plugins.records
        assert name not in sys.modules


@pytest.mark.anyio
async def test_dry_run_with_missing_dependencies_extracts_nothing(
    tmp_path: Path, plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not imported, so not extracted either: no staging directory is written for it."""
    import kernel.install as install

    def extract(*args: object) -> Path:
        raise AssertionError("a dry run that imports nothing must not extract the archive")

    monkeypatch.setattr(install, "extract_archive", extract)
    name = f"{PREFIX}deps_noextract"
    data = archive(name, NEEDS_MISSING_DEP, manifest={"dependencies": ["nekobot-surely-gone>=2"]})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        result = await install_archive(kernel, data, dry_run=True)
        assert result.dependencies.missing == ("nekobot-surely-gone>=2",)
        assert result.conflicts_unknown is not None


GATE = "nekobot_test_install_gate"

SLOW_IMPORT = f"""
import sys

# In the import thread: the test cancels the install meanwhile, then lets this go on.
gate = sys.modules["{GATE}"]
gate.importing.set()
gate.release.wait(30)
"""


@pytest.mark.anyio
@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_cancelled_install_removes_its_staging_directory(
    tmp_path: Path, plugin_dir: Path, dry_run: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"{PREFIX}cancelled_{int(dry_run)}"
    gate = types.SimpleNamespace(importing=threading.Event(), release=threading.Event())
    monkeypatch.setitem(sys.modules, GATE, gate)
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        with anyio.CancelScope() as cancelled:

            async def cancel_while_importing() -> None:
                assert await anyio.to_thread.run_sync(gate.importing.wait, PATIENCE)
                cancelled.cancel()
                gate.release.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_while_importing)
                await install_archive(kernel, archive(name, SLOW_IMPORT), dry_run=dry_run)
        assert cancelled.cancel_called  # while it was importing (a dry run may still finish)
        assert listing(plugin_dir) == []
        assert name not in kernel.plugins.records
    purge_modules(name)


@pytest.mark.anyio
async def test_dry_run_with_satisfied_dependencies_imports_as_usual(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}deps_ok"
    data = archive(name, code("zzdepsok", "ok"), manifest={"dependencies": ["anyio>=1"]})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        result = await install_archive(kernel, data, dry_run=True)
        assert result.conflicts_unknown is None
        assert result.dependencies.missing == () and result.dependencies.problem is None
        with pytest.raises(PluginLoadError, match="ZeroDivisionError"):
            await install_archive(
                kernel,
                archive(name, "1 / 0\n", manifest={"dependencies": ["anyio>=1"]}),
                dry_run=True,
            )
        assert listing(plugin_dir) == []


ROUTES = """
from starlette.responses import PlainTextResponse

from kernel import ChannelSpec, RouteSpec, hookimpl

async def page(request):
    return PlainTextResponse("{reply}")

@hookimpl
def nekobot_routes():
    return [
        RouteSpec("/zzinst/page", page, methods={methods}),
        RouteSpec("/zzinst/live", page, websocket=True),
    ]

@hookimpl
def nekobot_ws_channels():
    return [ChannelSpec(c) for c in {channels}]
"""


def routes_code(reply: str, methods: tuple[str, ...], channels: tuple[str, ...]) -> str:
    return ROUTES.format(reply=reply, methods=methods, channels=channels)


@pytest.mark.anyio
async def test_dry_run_reports_route_and_channel_conflicts(
    tmp_path: Path, plugin_dir: Path
) -> None:
    owner, rival = f"{PREFIX}routes_owner", f"{PREFIX}routes_rival"
    write_plugin(plugin_dir, owner, routes_code("owner", ("GET",), ("zzinst.feed",)))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        before = listing(plugin_dir)
        routes_before = {e.item[0]: e.owner for e in kernel.routes}
        data = archive(
            rival, routes_code("rival", ("GET", "POST"), ("zzinst.feed", "zzinst.other"))
        )
        result = await install_archive(kernel, data, dry_run=True, enable=True)
        assert result.conflicts == () and result.conflicts_unknown is None
        found = {(c.kind, c.key, c.holder) for c in result.registry_conflicts}
        assert found == {
            ("route", "GET /zzinst/page", owner),
            ("route", "WS /zzinst/live", owner),
            ("WebSocket channel", "zzinst.feed", owner),
        }  # POST /zzinst/page and zzinst.other are free
        # Nothing was registered or written.
        assert {e.item[0]: e.owner for e in kernel.routes} == routes_before
        assert {e.owner for e in kernel.channels if e.item.name.startswith("zzinst")} == {owner}
        assert listing(plugin_dir) == before
        assert rival not in kernel.plugins.records

        # The dry run told the truth: enabling it fails on the route.
        with pytest.raises(PluginLoadError, match="zzinst/page"):
            await install_archive(kernel, data, enable=True)
        assert listing(plugin_dir) == before

        # Replacing the owner itself clashes with nothing: its own routes are replaced.
        again = archive(owner, routes_code("v2", ("GET",), ("zzinst.feed",)))
        result = await install_archive(kernel, again, dry_run=True, overwrite=True)
        assert result.registry_conflicts == () and result.replaced


@pytest.mark.anyio
async def test_dry_run_refuses_a_route_declared_twice(tmp_path: Path, plugin_dir: Path) -> None:
    name = f"{PREFIX}routes_twice"
    data = archive(name, routes_code("x", ("GET", "get"), ()))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        with pytest.raises(PluginLoadError, match="route 'GET /zzinst/page' more than once"):
            await install_archive(kernel, data, dry_run=True)
        assert listing(plugin_dir) == []


@pytest.mark.anyio
async def test_incompatible_plugin_is_refused(tmp_path: Path, plugin_dir: Path) -> None:
    data = archive(f"{PREFIX}future", "", manifest={"nekobot": ">=99"})
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        with pytest.raises(ManifestError, match="nekobot"):
            await install_archive(kernel, data)
        assert listing(plugin_dir) == []


@pytest.mark.anyio
async def test_existing_directory_of_that_name_needs_overwrite(
    tmp_path: Path, plugin_dir: Path
) -> None:
    name = f"{PREFIX}clash"
    (plugin_dir / name).mkdir()
    (plugin_dir / name / "notes.txt").write_text("mine")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        with pytest.raises(InstallError, match="already exists"):
            await install_archive(kernel, archive(name, code("zzclash", "hi")))
        assert listing(plugin_dir) == [name, f"{name}/notes.txt"]


@pytest.mark.anyio
async def test_upload_limit_comes_from_the_settings(tmp_path: Path, plugin_dir: Path) -> None:
    data = archive(f"{PREFIX}big", f"X = {os.urandom(2000).hex()!r}\n")
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        await kernel.update_settings(upload_max_bytes=1024)
        with pytest.raises(InstallError, match="over the limit"):
            await install_archive(kernel, data)
        assert listing(plugin_dir) == []


@pytest.mark.anyio
async def test_malicious_corpus_leaves_the_plugin_directory_untouched(
    tmp_path: Path, plugin_dir: Path
) -> None:
    write_plugin(plugin_dir, f"{PREFIX}bystander", code("zzby", "still here"))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugin_dir]) as kernel:
        before = tree(plugin_dir)
        records = set(kernel.plugins.records)
        for case, make, limits, pattern in MALICIOUS:
            with pytest.raises((InstallError, ManifestError), match=pattern):
                await install_archive(kernel, make(), enable=True, limits=limits or ArchiveLimits())
            assert tree(plugin_dir) == before, case
            assert not [n for n in names(plugin_dir) if n.startswith(STAGING_PREFIX)]
            assert set(kernel.plugins.records) == records, case
        assert not (tmp_path / "evil.py").exists()
        assert await MockBot(kernel).receive("/zzby") == ["still here"]
