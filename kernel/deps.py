"""Installing the Python dependencies a plugin's manifest lists, with pip.

Only when the `allow_pip_install` setting is on. Every distribution installed now is
passed to pip as a constraint (`name==version`), so a plugin can add packages but can
never change a version the core (or another plugin) already depends on. pip first
resolves with `--dry-run`; nothing is installed unless the whole set resolves.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Sequence

import anyio
import anyio.to_thread
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kernel.errors import InstallError

PIP_TIMEOUT = 600.0


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements that the installed distributions do not satisfy yet."""
    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def _constraints_file() -> str:
    """A temporary constraints file pinning every installed distribution."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pins.setdefault(canonicalize_name(name), dist.version)
    fd, path = tempfile.mkstemp(prefix="nekobot-constraints-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    return path


_BLAME = re.compile(
    r"(?:satisfies the requirement|No matching distribution found for|"
    r"The user requested) ([A-Za-z0-9._-]+)"
)


def _culprit(requirements: Sequence[str], output: str) -> str:
    """The requirements pip's output blames (all of them if it blames none it knows)."""
    blamed = {canonicalize_name(m) for m in _BLAME.findall(output)}
    named = [r for r in requirements if canonicalize_name(Requirement(r).name) in blamed]
    return ", ".join(named or requirements)


def _last_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip failed"])[-1].removeprefix("ERROR:").strip()


async def install_requirements(
    requirements: Sequence[str], *, pip_args: Sequence[str] = (), dry_run: bool = False
) -> list[str]:
    """Install what is missing of `requirements` (or, with `dry_run`, only resolve it).

    Returns the requirements that were (or would be) installed. Raises InstallError
    naming the requirement that failed; on a failed resolution nothing is installed.
    """
    missing = await anyio.to_thread.run_sync(missing_requirements, requirements)
    if not missing:
        return []
    constraints = await anyio.to_thread.run_sync(_constraints_file)
    base = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-c",
        constraints,
        *pip_args,
    ]
    # Resolve first: a real install that fails halfway could leave some packages in.
    steps = [["--dry-run"]] if dry_run else [["--dry-run"], []]
    try:
        for step in steps:
            with anyio.fail_after(PIP_TIMEOUT):
                result = await anyio.run_process([*base, *step, *missing], check=False)
            output = (result.stdout + result.stderr).decode("utf-8", "replace")
            if result.returncode != 0:
                raise InstallError(
                    f"installing dependencies failed for {_culprit(missing, output)}: "
                    f"{_last_error(output)}"
                )
    except TimeoutError:
        raise InstallError(
            f"installing {', '.join(missing)} took longer than {PIP_TIMEOUT:.0f} s"
        ) from None
    finally:
        await anyio.to_thread.run_sync(os.unlink, constraints)
    importlib.invalidate_caches()
    return missing
