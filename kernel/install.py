"""Installing an uploaded plugin archive into the first plugin directory.

`install_archive` validates the archive (`kernel.archive`), extracts it into a staging
directory next to its destination, imports the staged package once to check that it
loads and to learn the commands it would register (so that a dry run can report the
conflicts), and only then moves it into place with one rename. A plugin that replaces
an active one is swapped in transactionally: if the new version does not load, the old
files come back and the old generation keeps serving.

Manifest `dependencies` that are not installed yet are refused unless the
`allow_pip_install` setting is on; then they are installed with pip (`kernel.deps`)
before the staged package is imported. A dry run only resolves them. Packages that
pip installed stay installed if the plugin then fails to load.

Importing the staged package runs its module-level code (as enabling it would):
plugin upload must only be offered to administrators.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import attrs
import pluggy

from kernel.archive import ArchiveLimits, extract_archive, inspect_archive, remove_staging
from kernel.calling import Contributions, check_hook_names, collect_contributions
from kernel.commands import CommandEntry
from kernel.deps import install_requirements, missing_requirements
from kernel.errors import InstallError, NekoError, PluginExistsError, PluginLoadError
from kernel.generations import STATE_SECTION
from kernel.hookspecs import PROJECT, SPEC_MODULES
from kernel.loader import PluginCandidate, shadows_module
from kernel.manifest import check_compatible
from kernel.models import CommandConflict, PluginInfo, PluginManifest, PluginSource, PluginState

if TYPE_CHECKING:
    from kernel.generations import PluginRecord
    from kernel.kernel import Kernel


@attrs.frozen
class InstallResult:
    """What `install_archive` did (or, for a dry run, would do)."""

    manifest: PluginManifest
    name: str
    #: The files are in the plugin directory now (never for a dry run).
    installed: bool
    #: The plugin is enabled and active now.
    enabled: bool
    #: Command conflicts the plugin takes part in (a dry run: would take part in).
    conflicts: tuple[CommandConflict, ...]
    dry_run: bool
    #: An existing plugin was replaced (a dry run: would be replaced).
    replaced: bool
    #: The plugin as the kernel sees it now (a dry run: the existing plugin, if any).
    plugin: PluginInfo | None


async def install_archive(
    kernel: Kernel,
    data: bytes,
    *,
    enable: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    limits: ArchiveLimits | None = None,
) -> InstallResult:
    """Install the plugin in the zip archive `data` into the kernel's first plugin directory.

    `enable` also loads it (a fresh install without `enable` is remembered as disabled);
    `overwrite` replaces an existing user plugin of the same name (reloading it if it is
    active; if the new version fails, the old one is restored and keeps serving);
    `dry_run` validates, imports the package to report its command conflicts, and writes
    nothing. `limits` defaults to ArchiveLimits with the `upload_max_bytes` setting.
    Errors: InstallError (the archive, the name, dependencies), ManifestError,
    PluginLoadError (the package does not import or contributes something invalid),
    ReloadError (replacing an active plugin failed; the old one still serves).
    """
    if limits is None:
        limits = ArchiveLimits(max_bytes=kernel.settings.upload_max_bytes)
    plan = await anyio.to_thread.run_sync(inspect_archive, data, limits)
    name, manifest = plan.name, plan.manifest
    check_compatible(manifest)
    missing = await anyio.to_thread.run_sync(missing_requirements, manifest.dependencies)
    if missing and not kernel.settings.allow_pip_install:
        raise InstallError(
            f"plugin {name!r} requires dependencies ({', '.join(missing)}); "
            "dependency installation is disabled (setting allow_pip_install)"
        )
    rec = kernel.plugins.records.get(name)
    target = await anyio.to_thread.run_sync(_destination, kernel, name, rec)
    existing = rec is not None or await anyio.to_thread.run_sync(os.path.lexists, target)
    await anyio.to_thread.run_sync(_check_name, name, rec, existing, overwrite)

    staged = await anyio.to_thread.run_sync(extract_archive, plan, data, target.parent)
    try:
        if missing:
            # Resolved first (nothing is installed unless all of them resolve), then
            # installed before the package is imported, since it may import them.
            await install_requirements(missing, pip_args=kernel.config.pip_args, dry_run=dry_run)
        commands = await _staged_commands(kernel, name, manifest, staged, rec)
        preview = tuple(kernel.commands.preview(name, commands))
        if dry_run:
            return InstallResult(
                manifest=manifest,
                name=name,
                installed=False,
                enabled=False,
                conflicts=preview,
                dry_run=True,
                replaced=existing,
                plugin=kernel.plugins.info(name) if rec is not None else None,
            )
        await _put_in_place(kernel, name, staged, target, enable=enable, overwrite=overwrite)
    finally:
        await anyio.to_thread.run_sync(remove_staging, staged)

    info = kernel.plugins.info(name)
    active = info.enabled and info.state is PluginState.ACTIVE
    return InstallResult(
        manifest=manifest,
        name=name,
        installed=True,
        enabled=active,
        conflicts=kernel.plugins.conflicts_of(name) if active else preview,
        dry_run=False,
        replaced=existing,
        plugin=info,
    )


def _destination(kernel: Kernel, name: str, rec: PluginRecord | None) -> Path:
    """Where the plugin's files go: where they are now, or the first plugin directory."""
    if rec is not None and rec.candidate.source is PluginSource.USER and rec.candidate.path:
        return rec.candidate.path
    dirs = kernel.config.plugin_dirs
    if not dirs:
        raise InstallError("no plugin directory is configured")
    for directory in dirs:
        if os.path.lexists(directory / name):
            return directory / name
    return dirs[0] / name


def _check_name(name: str, rec: PluginRecord | None, existing: bool, overwrite: bool) -> None:
    """Refuse a name that another plugin or module owns, or an existing plugin's name."""
    if rec is not None and rec.candidate.source is not PluginSource.USER:
        raise PluginExistsError(
            f"plugin name {name!r} is taken by the {rec.candidate.source.value} plugin {name!r}"
        )
    # An active user plugin is found by the kernel's own finder, which shadows_module skips.
    if (rec is None or rec.generation is None) and shadows_module(name):
        raise InstallError(
            f"plugin name {name!r} would shadow an importable module; rename the plugin"
        )
    if existing and not overwrite:
        raise _exists(name, installed=rec is not None)


def _exists(name: str, *, installed: bool) -> PluginExistsError:
    if installed:
        return PluginExistsError(
            f"plugin {name!r} is already installed; use overwrite to replace it"
        )
    return PluginExistsError(
        f"{name!r} already exists in the plugin directory; use overwrite to replace it"
    )


# -- importing the staged package ------------------------------------------------------


async def _staged_commands(
    kernel: Kernel,
    name: str,
    manifest: PluginManifest,
    staged: Path,
    rec: PluginRecord | None,
) -> list[CommandEntry]:
    """Import the staged package once; return the command entries it would register.

    A running plugin of the same name is not disturbed: its lock keeps its own
    operations out meanwhile, and its modules are set aside and put back after.
    """
    if rec is not None:
        async with rec.lock:
            contributions = await anyio.to_thread.run_sync(
                _import_staged, kernel, name, manifest, staged
            )
    else:
        contributions = await anyio.to_thread.run_sync(
            _import_staged, kernel, name, manifest, staged
        )
    try:
        return kernel.commands.prepare(name, contributions.commands)
    except NekoError as exc:
        raise PluginLoadError(name, exc.message) from None


def _import_staged(
    kernel: Kernel, name: str, manifest: PluginManifest, staged: Path
) -> Contributions:
    """Import the package at `staged` as `name`, collect its contributions, forget it."""
    loader = kernel.loader
    roots = loader.finder.roots
    previous = roots.get(name)
    candidate = PluginCandidate(name, PluginSource.USER, name, manifest, staged)
    try:
        try:
            imported = loader.import_plugin(candidate, fresh=True)
        except (Exception, SystemExit) as exc:
            raise PluginLoadError(name, f"import failed: {type(exc).__name__}: {exc}") from None
        try:
            return _contributions_of(name, imported.module)
        finally:
            imported.rollback()
    finally:
        if previous is None:
            roots.pop(name, None)
        else:
            roots[name] = previous


def _contributions_of(name: str, module: ModuleType) -> Contributions:
    """Check a module's hookimpls as loading would, and call its contribution hooks."""
    # A throwaway plugin manager: the kernel's own must not see the staged module.
    pm = pluggy.PluginManager(PROJECT)
    for spec in SPEC_MODULES:
        pm.add_hookspecs(spec)
    pm_name = f"{name}#staged"
    try:
        pm.register(module, name=pm_name)
    except Exception as exc:
        raise PluginLoadError(name, f"invalid hook implementation: {exc}") from None
    check_hook_names(name, module, {c.name for c in pm.get_hookcallers(module) or []})
    try:
        return collect_contributions(pm, pm_name, name)
    except NekoError as exc:
        raise PluginLoadError(name, exc.message) from None


# -- moving the package into place -----------------------------------------------------


async def _put_in_place(
    kernel: Kernel, name: str, staged: Path, target: Path, *, enable: bool, overwrite: bool
) -> None:
    """Move the staged package to `target` and load it; on any failure undo everything."""
    plugins = kernel.plugins
    rec = plugins.records.get(name)
    if rec is not None and not overwrite:
        # Installed by a concurrent install since `_check_name` looked.
        raise _exists(name, installed=True)
    was_active = rec is not None and rec.generation is not None
    # A new plugin stays disabled until someone enables it (also after a restart); that
    # is stored before the files appear, so that the hot reloader does not start it either.
    new_disabled = rec is None and not enable
    stored = await kernel.storage.state_get(STATE_SECTION, name) if new_disabled else None
    backup: Path | None = None
    swapped = False
    try:
        if new_disabled:
            await plugins.remember_enabled(name, False)
        backup = await anyio.to_thread.run_sync(_swap_in, staged, target, overwrite)
        swapped = True
        if was_active:
            await plugins.reload(name)
        else:
            await plugins.rescan()
            new = plugins.records.get(name)
            if new is None:
                raise InstallError(
                    f"plugin {name!r} was not found in {target.parent} after install"
                )
            if new.candidate.problem:
                raise InstallError(f"plugin {name!r} cannot be loaded: {new.candidate.problem}")
        if enable:
            await plugins.enable(name)
        elif new_disabled:
            await plugins.disable(name)
    except BaseException:
        with anyio.CancelScope(shield=True):
            if swapped:
                try:
                    await anyio.to_thread.run_sync(_swap_back, staged, target, backup)
                except OSError as exc:
                    # Keep the original error; this one needs an administrator's eyes.
                    kernel.log.error("could not restore %s after a failed install: %s", target, exc)
            if new_disabled:
                # What was stored before (usually nothing) comes back, after the files left.
                if stored is None:
                    await kernel.storage.state_delete(STATE_SECTION, name)
                else:
                    await kernel.storage.state_set(STATE_SECTION, name, stored)
            if swapped and was_active:
                # The failed reload left the old generation serving; load it again from
                # the restored files so that module state matches what is on disk.
                with contextlib.suppress(NekoError):
                    await plugins.reload(name)
            elif swapped:
                if rec is None and name in plugins.records:
                    with contextlib.suppress(NekoError):
                        await plugins.forget_vanished(name)
                await plugins.rescan()
        raise


def _swap_in(staged: Path, target: Path, replace: bool) -> Path | None:
    """Rename `staged` to `target`, moving what is there aside first; return where to.

    Without `replace`, something at `target` (put there by a concurrent install since
    the name was checked) is an error.
    """
    backup = None
    try:
        if os.path.lexists(target):
            if not replace:
                raise _exists(target.name, installed=False)
            backup = staged.parent / "previous"
            os.rename(target, backup)
        try:
            # Without `replace` this also fails if a non-empty directory appeared meanwhile.
            os.rename(staged, target)
        except BaseException:
            if backup is not None:
                os.rename(backup, target)
            raise
    except OSError as exc:
        raise InstallError(f"cannot move plugin into {target}: {exc.strerror or exc}") from None
    return backup


def _swap_back(staged: Path, target: Path, backup: Path | None) -> None:
    """Undo `_swap_in`: the new files go back to staging, the old ones return."""
    if os.path.lexists(target):
        os.rename(target, staged)
    if backup is not None:
        os.rename(backup, target)
