"""Plugin dependencies: what is missing, pip under constraints, nothing half-installed."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.deps import install_requirements, missing_requirements
from kernel.errors import InstallError
from kernel.testing import MockBot, running_kernel

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


def _uninstall(name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "-q", name],
        capture_output=True,
        check=False,
    )
    sys.modules.pop(name, None)


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "wheels"
    directory.mkdir()
    yield directory
    for name in ("nekotestdep_a", "nekotestdep_b"):
        _uninstall(name)


def test_missing_requirements() -> None:
    assert missing_requirements(["anyio>=1", "pluggy"]) == []
    assert missing_requirements(["anyio<1"]) == ["anyio<1"]
    assert missing_requirements(["surely-not-installed-nekobot-x"]) == [
        "surely-not-installed-nekobot-x"
    ]
    assert missing_requirements(['anyio<1; python_version < "3"']) == []


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


def _plugin_zip(dependencies: list[str]) -> bytes:
    buf = io.BytesIO()
    deps = ", ".join(f'"{d}"' for d in dependencies)
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dd_withdep/__init__.py", PLUGIN)
        zf.writestr(
            "dd_withdep/plugin.toml",
            f'name = "dd_withdep"\nversion = "1.0"\ndependencies = [{deps}]\n',
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
