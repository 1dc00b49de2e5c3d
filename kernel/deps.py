"""Installing the Python dependencies a plugin's manifest lists, with pip.

Only when the `allow_pip_install` setting is on. Every distribution installed now is
passed to pip as a constraint (`name==version`), so a plugin can add packages but can
never change a version the core (or another plugin) already depends on. pip first
resolves with `--dry-run`; nothing is installed unless the whole set resolves.

`installed_distributions` snapshots what is installed, so that an install can take back
exactly the distributions it added (`uninstall_distributions`) when the plugin then
fails to load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence

import anyio
import anyio.to_thread
import attrs
from packaging.markers import UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kernel.errors import InstallError

PIP_TIMEOUT = 600.0


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements that the installed distributions do not satisfy yet.

    Raises InstallError for a requirement whose marker cannot be evaluated here.
    """
    missing = []
    for text in requirements:
        req = Requirement(text)
        try:
            if req.marker is not None and not req.marker.evaluate():
                continue
        except (UndefinedComparison, UndefinedEnvironmentName) as exc:
            # Parses as PEP 508 but compares e.g. `python_version ~= "abc"`.
            raise InstallError(f"dependency {text!r}: cannot evaluate its marker: {exc}") from None
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


@attrs.frozen
class DependencyStatus:
    """A plugin's manifest dependencies as an install (or a dry run) found them."""

    #: The manifest's `dependencies`.
    requirements: tuple[str, ...] = ()
    #: Those the installed distributions do not satisfy.
    missing: tuple[str, ...] = ()
    #: The `allow_pip_install` setting.
    pip_install_allowed: bool = False
    #: A dry run: what pip would install (`name==version`), if it was asked to resolve.
    would_install: tuple[str, ...] = ()
    #: An install: the distributions pip added for this plugin (`name==version`).
    installed: tuple[str, ...] = ()
    #: Why installing the missing ones would fail (setting off, pip cannot resolve).
    problem: str | None = None


async def run_pip(command: Sequence[str]) -> tuple[int, str]:
    """Run pip; its exit code and its output (stdout and stderr together).

    The output goes to a temporary file, not to pipes: a run cancelled midway (its
    process is killed) would leave pipe transports behind for the garbage collector.
    """
    out = await anyio.to_thread.run_sync(tempfile.TemporaryFile)
    try:
        result = await anyio.run_process(command, stdout=out, stderr=subprocess.STDOUT, check=False)

        def read() -> bytes:
            out.seek(0)
            return out.read()

        data = await anyio.to_thread.run_sync(read)
    finally:
        out.close()
    return result.returncode, data.decode("utf-8", "replace")


def installed_distributions() -> dict[str, str]:
    """Every installed distribution: canonical name -> version."""
    importlib.invalidate_caches()
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pins.setdefault(canonicalize_name(name), dist.version)
    return pins


def changed_distributions(
    before: Mapping[str, str], after: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """What changed between two snapshots: (added: name -> version,
    changed: name -> (old, new)). Removed distributions are not reported."""
    added = {n: v for n, v in after.items() if n not in before}
    changed = {n: (before[n], v) for n, v in after.items() if n in before and before[n] != v}
    return added, changed


def _constraints_file() -> str:
    """A temporary constraints file pinning every installed distribution."""
    pins = installed_distributions()
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
    requirements: Sequence[str],
    *,
    pip_args: Sequence[str] = (),
    dry_run: bool = False,
    resolved: bool = False,
) -> list[str]:
    """Install what is missing of `requirements` (or, with `dry_run`, only resolve it).

    Returns the requirements that were (or would be) installed. Raises InstallError
    naming the requirement that failed; on a failed resolution nothing is installed.
    `resolved`: the caller resolved them just now (`resolve_requirements`), skip that.
    """
    missing = await anyio.to_thread.run_sync(missing_requirements, requirements)
    if not missing:
        return []
    # Resolve first: a real install that fails halfway could leave some packages in.
    steps = [["--dry-run"]] if dry_run else [[]] if resolved else [["--dry-run"], []]
    await _pip_install(missing, pip_args, steps)
    return missing


async def resolve_requirements(
    requirements: Sequence[str], *, pip_args: Sequence[str] = ()
) -> list[str]:
    """What pip would install for the missing ones of `requirements`, installing nothing.

    Returns `name==version` of each distribution pip would add, sorted. Raises
    InstallError naming the requirement that does not resolve.
    """
    missing = await anyio.to_thread.run_sync(missing_requirements, requirements)
    if not missing:
        return []
    fd, report = tempfile.mkstemp(prefix="nekobot-pip-report-", suffix=".json")
    os.close(fd)
    try:
        await _pip_install(missing, pip_args, [["--dry-run", "--report", report]])
        text = await anyio.Path(report).read_text(encoding="utf-8")
    finally:
        with anyio.CancelScope(shield=True):  # also when cancelled: no file left behind
            await anyio.to_thread.run_sync(os.unlink, report)
    try:
        items = json.loads(text)["install"]
        return sorted(
            f"{canonicalize_name(i['metadata']['name'])}=={i['metadata']['version']}" for i in items
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InstallError(f"cannot read pip's resolution report: {exc!r}") from None


async def _pip_install(
    missing: Sequence[str], pip_args: Sequence[str], steps: Sequence[Sequence[str]]
) -> None:
    """Run `pip install <step> missing` for each step, under the constraints file."""
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
    try:
        for step in steps:
            with anyio.fail_after(PIP_TIMEOUT):
                returncode, output = await run_pip([*base, *step, *missing])
            if returncode != 0:
                raise InstallError(
                    f"installing dependencies failed for {_culprit(missing, output)}: "
                    f"{_last_error(output)}"
                )
    except TimeoutError:
        raise InstallError(
            f"installing {', '.join(missing)} took longer than {PIP_TIMEOUT:.0f} s"
        ) from None
    finally:
        with anyio.CancelScope(shield=True):  # also when cancelled: no file left behind
            await anyio.to_thread.run_sync(os.unlink, constraints)
        importlib.invalidate_caches()


def _module_files(names: Collection[str]) -> set[str]:
    """The real paths of the Python files that the distributions `names` installed."""
    files: set[str] = set()
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.suffix == ".py":
                files.add(os.path.realpath(str(dist.locate_file(f))))
    return files


def _forget_modules(files: set[str]) -> None:
    """Drop the imported modules loaded from `files` (their files are gone)."""
    for key, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.realpath(path) in files:
            sys.modules.pop(key, None)


async def uninstall_distributions(names: Collection[str]) -> None:
    """Uninstall the distributions `names` with pip and forget their imported modules.

    Only for distributions that an install added moments ago. Raises InstallError
    naming them if pip fails.
    """
    if not names:
        return
    files = await anyio.to_thread.run_sync(_module_files, names)
    command = [
        sys.executable,
        "-m",
        "pip",
        "uninstall",
        "--disable-pip-version-check",
        "--no-input",
        "-y",
        *sorted(names),
    ]
    try:
        with anyio.fail_after(PIP_TIMEOUT):
            returncode, output = await run_pip(command)
    except TimeoutError:
        raise InstallError(
            f"uninstalling {', '.join(sorted(names))} took longer than {PIP_TIMEOUT:.0f} s"
        ) from None
    finally:
        importlib.invalidate_caches()
    _forget_modules(files)
    if returncode != 0:
        raise InstallError(f"uninstalling {', '.join(sorted(names))} failed: {_last_error(output)}")
