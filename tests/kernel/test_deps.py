"""Plugin dependencies: what is missing, pip under constraints, nothing half-installed."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kernel.deps import (
    changed_distributions,
    install_requirements,
    missing_requirements,
    resolve_requirements,
)
from kernel.errors import InstallError, PluginLoadError
from kernel.testing import MockBot, running_kernel, wait_until

pytestmark = pytest.mark.anyio


def make_wheel(directory: Path, name: str, version: str, code: str) -> Path:
    """A minimal pure-Python wheel of the module `name` (no build backend needed)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": code,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: nekobot-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def _uninstall(*names: str) -> None:
    # One pip run for all of them: each run costs about half a second.
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "-q", *names],
        capture_output=True,
        check=False,
    )
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "wheels"
    directory.mkdir()
    yield directory
    _uninstall(*(f"nekotestdep_{x}" for x in "abcde"))


def test_missing_requirements() -> None:
    assert missing_requirements(["anyio>=1", "pluggy"]) == []
    assert missing_requirements(["anyio<1"]) == ["anyio<1"]
    assert missing_requirements(["surely-not-installed-nekobot-x"]) == [
        "surely-not-installed-nekobot-x"
    ]
    assert missing_requirements(['anyio<1; python_version < "3"']) == []
    # Valid PEP 508, but the marker cannot be evaluated: a clear error, not a traceback.
    with pytest.raises(InstallError, match="cannot evaluate its marker"):
        missing_requirements(['anyio; python_version ~= "abc"'])


async def test_installs_missing_requirement_from_given_index(wheelhouse: Path) -> None:
    make_wheel(wheelhouse, "nekotestdep_a", "1.0", "VALUE = 'a'\n")
    args = ["--no-index", "--find-links", str(wheelhouse)]
    assert await install_requirements(["nekotestdep_a==1.0"], pip_args=args, dry_run=True) == [
        "nekotestdep_a==1.0"
    ]
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("nekotestdep_a")  # a dry run installs nothing
    assert await install_requirements(["nekotestdep_a==1.0"], pip_args=args) == [
        "nekotestdep_a==1.0"
    ]
    assert importlib.metadata.version("nekotestdep_a") == "1.0"
    assert await install_requirements(["nekotestdep_a==1.0"], pip_args=args) == []


async def test_core_versions_are_constraints(wheelhouse: Path) -> None:
    anyio_before = importlib.metadata.version("anyio")
    make_wheel(wheelhouse, "nekotestdep_a", "1.0", "")
    args = ["--no-index", "--find-links", str(wheelhouse)]
    with pytest.raises(InstallError) as caught:
        await install_requirements(["nekotestdep_a==1.0", "anyio<1"], pip_args=args)
    assert "anyio<1" in caught.value.message
    assert "nekotestdep_a" not in caught.value.message.split(":")[0]
    # Resolution failed as a whole: nothing was installed, the core is untouched.
    assert importlib.metadata.version("anyio") == anyio_before
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("nekotestdep_a")


PLUGIN = """
from kernel import hookimpl, CommandSpec
import nekotestdep_b

async def dep(cmd):
    return nekotestdep_b.VALUE

@hookimpl
def nekobot_commands():
    return [CommandSpec("depvalue", dep)]
"""


def _plugin_zip(dependencies: list[str], code: str = PLUGIN, name: str = "dd_withdep") -> bytes:
    buf = io.BytesIO()
    deps = ", ".join(f'"{d}"' for d in dependencies)
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{name}/__init__.py", code)
        zf.writestr(
            f"{name}/plugin.toml",
            f'name = "{name}"\nversion = "1.0"\ndependencies = [{deps}]\n',
        )
    return buf.getvalue()


async def test_upload_installs_dependencies_only_when_allowed(
    wheelhouse: Path, tmp_path: Path
) -> None:
    from kernel.install import install_archive

    make_wheel(wheelhouse, "nekotestdep_b", "2.0", "VALUE = 'from the wheel'\n")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    args = ("--no-index", "--find-links", str(wheelhouse))
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins], pip_args=args) as k:
        with pytest.raises(InstallError, match="allow_pip_install"):
            await install_archive(k, _plugin_zip(["nekotestdep_b==2.0"]), enable=True)
        assert list(plugins.iterdir()) == []
        await k.update_settings(allow_pip_install=True)
        with pytest.raises(InstallError, match=r"nekotestdep_b==9\.9"):
            await install_archive(k, _plugin_zip(["nekotestdep_b==9.9"]), enable=True)
        assert list(plugins.iterdir()) == []
        result = await install_archive(k, _plugin_zip(["nekotestdep_b==2.0"]), enable=True)
        assert result.enabled
        assert await MockBot(k).receive("/depvalue") == ["from the wheel"]


@pytest.mark.parametrize("resolve_only", [False, True])
async def test_a_cancelled_pip_run_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolve_only: bool
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    args = ["--no-index", "--find-links", str(tmp_path)]
    with anyio.move_on_after(0.05) as cancelled:  # pip is still starting up
        if resolve_only:
            await resolve_requirements(["nekobot-surely-missing-x"], pip_args=args)
        else:
            await install_requirements(["nekobot-surely-missing-x"], pip_args=args)
    assert cancelled.cancelled_caught
    assert list(temp.iterdir()) == []


def test_changed_distributions() -> None:
    before = {"a": "1.0", "b": "2.0", "gone": "1"}
    after = {"a": "1.0", "b": "2.1", "c": "3.0"}
    assert changed_distributions(before, after) == ({"c": "3.0"}, {"b": ("2.0", "2.1")})


async def test_resolve_reports_what_pip_would_install(wheelhouse: Path) -> None:
    make_wheel(wheelhouse, "nekotestdep_e", "1.0", "")
    args = ["--no-index", "--find-links", str(wheelhouse)]
    assert await resolve_requirements(["nekotestdep_e>=1", "anyio"], pip_args=args) == [
        "nekotestdep-e==1.0"
    ]
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("nekotestdep_e")
    with pytest.raises(InstallError, match=r"nekotestdep_e>=2"):
        await resolve_requirements(["nekotestdep_e>=2"], pip_args=args)


USES_DEPS = """
from kernel import hookimpl, CommandSpec
import nekotestdep_c, nekotestdep_d

async def dep(cmd):
    return nekotestdep_d.VALUE

@hookimpl
def nekobot_commands():
    return [CommandSpec("depvalue2", dep)]
"""

FAILS_TO_START = (
    USES_DEPS
    + """
@hookimpl
async def nekobot_plugin_start(ctx):
    raise RuntimeError("cannot start")
"""
)

FAILS_TO_IMPORT = USES_DEPS + "\nraise RuntimeError('broken after importing its deps')\n"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_failed_install_uninstalls_only_what_it_installed(
    wheelhouse: Path, tmp_path: Path
) -> None:
    from kernel.install import install_archive

    make_wheel(wheelhouse, "nekotestdep_c", "1.0", "VALUE = 'c'\n")
    make_wheel(wheelhouse, "nekotestdep_d", "1.0", "VALUE = 'd'\n")
    args = ("--no-index", "--find-links", str(wheelhouse))
    # Installed before: a failed plugin install must leave it alone.
    await install_requirements(["nekotestdep_c==1.0"], pip_args=args)
    import nekotestdep_c

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    name = "dd_leftover"
    deps = ["nekotestdep_c==1.0", "nekotestdep_d==1.0"]
    async with running_kernel(tmp_path / "data", plugin_dirs=[plugins], pip_args=args) as k:
        await k.update_settings(allow_pip_install=True)
        # The log file is written by a thread of its own, whenever: let it exist first.
        await wait_until(k.logging.file.exists)
        data_before = _listing(tmp_path / "data")

        dry = await install_archive(k, _plugin_zip(deps, USES_DEPS, name), dry_run=True)
        assert dry.dependencies.missing == ("nekotestdep_d==1.0",)
        assert dry.dependencies.would_install == ("nekotestdep-d==1.0",)
        assert dry.conflicts_unknown is not None and dry.dependencies.problem is None
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("nekotestdep_d")

        for code, failure in ((FAILS_TO_START, "cannot start"), (FAILS_TO_IMPORT, "broken")):
            with pytest.raises(PluginLoadError) as caught:
                await install_archive(k, _plugin_zip(deps, code, name), enable=True)
            message = caught.value.message
            assert failure in message
            assert "uninstalled again: nekotestdep-d==1.0" in message
            with pytest.raises(importlib.metadata.PackageNotFoundError):
                importlib.metadata.version("nekotestdep_d")
            assert "nekotestdep_d" not in sys.modules
            assert importlib.metadata.version("nekotestdep_c") == "1.0"
            assert sys.modules["nekotestdep_c"] is nekotestdep_c
            assert list(plugins.iterdir()) == []
            assert name not in k.plugins.records
            assert await k.storage.state_get("plugins", name) is None
            assert _listing(tmp_path / "data") == data_before

        # The same archive, working: the dependency is installed and stays.
        result = await install_archive(k, _plugin_zip(deps, USES_DEPS, name), enable=True)
        assert result.enabled
        assert result.dependencies.installed == ("nekotestdep-d==1.0",)
        assert await MockBot(k).receive("/depvalue2") == ["d"]
    sys.modules.pop(name, None)


async def test_a_changed_version_is_reported_not_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The constraints make it impossible for pip; should it happen anyway, the error
    # says so instead of trying to put the old version back.
    import kernel.install as install

    # "w" appeared too, but pip did not plan it: someone else's (another process's).
    snapshots = iter([{"x": "1.0", "y": "1.0"}, {"x": "2.0", "y": "1.0", "z": "0.1", "w": "1.0"}])
    removed: list[list[str]] = []

    async def uninstall(names: list[str]) -> None:
        removed.append(sorted(names))

    monkeypatch.setattr(install, "installed_distributions", lambda: next(snapshots))
    monkeypatch.setattr(install, "uninstall_distributions", uninstall)
    error = PluginLoadError("dd_changed", "cannot start")
    async with running_kernel(tmp_path / "data") as k:
        await install._take_back(k, "dd_changed", next(snapshots), frozenset({"z"}), error)
        warnings = [r.message for r in k.logging.buffer.records if r.level == "WARNING"]
        assert any("left alone what pip did not install for it: w" in m for m in warnings)
    assert removed == [["z"]]
    assert error.message == (
        "cannot start; the dependencies pip installed for it were uninstalled again: "
        "z==0.1; pip changed installed versions, not restored: x 1.0 -> 2.0"
    )
    assert str(error) == error.message
