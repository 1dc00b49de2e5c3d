"""Installing an uploaded plugin archive into the first plugin directory.

`install_archive` validates the archive (`kernel.archive`), extracts it into a staging
directory next to its destination, imports the staged package once to check that it
loads and to learn what it would register (so that a dry run can report the command,
route and WebSocket channel conflicts), and only then moves it into place with one
rename. A plugin that replaces an active one is swapped in transactionally: if the new
version does not load, the old files come back and the old generation keeps serving.

Manifest `dependencies` that are not installed yet are refused unless the
`allow_pip_install` setting is on; then they are installed with pip (`kernel.deps`)
before the staged package is imported, and if the install fails after that, the
distributions pip added are uninstalled again. Installs with dependencies are
serialized per kernel, so that one install's snapshot never sees another's packages.
A dry run installs nothing: it only resolves missing dependencies (when allowed), and
neither extracts nor imports a package whose dependencies are missing, so its
conflicts stay unknown.

Importing the staged package runs its module-level code (as enabling it would):
plugin upload must only be offered to administrators.
"""

from __future__ import annotations

import contextlib
import errno
import os
import weakref
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import attrs

from kernel.archive import (
    ArchiveLimits,
    ArchivePlan,
    extract_archive,
    inspect_archive,
    remove_staging,
)
from kernel.calling import Contributions
from kernel.deps import (
    DependencyStatus,
    changed_distributions,
    install_requirements,
    installed_distributions,
    missing_requirements,
    resolve_requirements,
    uninstall_distributions,
)
from kernel.errors import (
    ContributionError,
    InstallError,
    NekoError,
    PluginExistsError,
    PluginLoadError,
)
from kernel.generations import STATE_SECTION, registry_items
from kernel.loader import PluginCandidate, shadows_module
from kernel.manifest import check_compatible
from kernel.models import CommandConflict, PluginInfo, PluginManifest, PluginSource, PluginState
from kernel.staging import import_generation, new_plugin_manager, register_generation

if TYPE_CHECKING:
    from kernel.generations import PluginRecord
    from kernel.kernel import Kernel


@attrs.frozen
class RegistryConflict:
    """A key (a route, a WebSocket channel, ...) that another plugin registered already;
    enabling the plugin would fail on it."""

    #: The registry's kind: "route", "WebSocket channel", "middleware", ...
    kind: str
    #: The key: `METHOD /path` (`WS /path`) for a route, the name otherwise.
    key: str
    #: The plugin that holds the key.
    holder: str


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
    #: The manifest's dependencies: missing, would be or were installed.
    dependencies: DependencyStatus = attrs.field(factory=DependencyStatus)
    #: Why the conflicts are unknown (a dry run that could not import the package);
    #: `conflicts` and `registry_conflicts` are then empty. None when they are known.
    conflicts_unknown: str | None = None
    #: Routes, channels and other registered keys that another plugin holds
    #: (empty once the plugin is active: it could not be with such a clash).
    registry_conflicts: tuple[RegistryConflict, ...] = ()


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
    `dry_run` validates, imports the package to report its conflicts (unless some of
    its dependencies are missing), and writes and installs nothing. `limits` defaults
    to ArchiveLimits with the `upload_max_bytes` setting.
    Errors: InstallError (the archive, the name, dependencies), ManifestError,
    PluginLoadError (the package does not import or contributes something invalid),
    ReloadError (replacing an active plugin failed; the old one still serves).
    """
    if limits is None:
        limits = ArchiveLimits(max_bytes=kernel.settings.upload_max_bytes)
    plan = await anyio.to_thread.run_sync(inspect_archive, data, limits)
    name, manifest = plan.name, plan.manifest
    check_compatible(manifest)
    if not dry_run and not kernel.settings.allow_pip_install:
        missing = await anyio.to_thread.run_sync(missing_requirements, manifest.dependencies)
        if missing:
            raise _pip_disabled(name, missing)
    rec = kernel.plugins.records.get(name)
    target = await anyio.to_thread.run_sync(_destination, kernel, name, rec)
    existing = rec is not None or await anyio.to_thread.run_sync(os.path.lexists, target)
    await anyio.to_thread.run_sync(_check_name, name, rec, existing, overwrite)

    async with _dependency_lock(kernel, manifest.dependencies):
        if dry_run:
            return await _dry_run(kernel, plan, data, target.parent, rec, existing)
        async with _staging(plan, data, target.parent) as staged:
            deps, preview, registry = await _install(
                kernel, name, manifest, staged, target, rec, enable=enable, overwrite=overwrite
            )

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
        dependencies=deps,
        registry_conflicts=() if active else registry,
    )


def _pip_disabled(name: str, missing: Iterable[str]) -> InstallError:
    return InstallError(
        f"plugin {name!r} requires dependencies ({', '.join(missing)}); "
        "dependency installation is disabled (setting allow_pip_install)"
    )


_DEPENDENCY_LOCKS: weakref.WeakKeyDictionary[Kernel, anyio.Lock] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _dependency_lock(kernel: Kernel, requirements: Iterable[str]) -> AsyncIterator[None]:
    """Serialize the installs (and dry runs) that list dependencies, per kernel.

    One install's before/after snapshot of the installed distributions must not see
    another's packages, and one must not count on a package that another's rollback
    is about to uninstall.
    """
    if not tuple(requirements):
        yield
        return
    lock = _DEPENDENCY_LOCKS.get(kernel)
    if lock is None:
        lock = _DEPENDENCY_LOCKS[kernel] = anyio.Lock()
    async with lock:
        yield


@contextlib.asynccontextmanager
async def _staging(plan: ArchivePlan, data: bytes, parent: Path) -> AsyncIterator[Path]:
    """The archive extracted into a fresh staging directory in `parent`; removed after,
    also when the install is cancelled."""
    staged = await anyio.to_thread.run_sync(extract_archive, plan, data, parent)
    try:
        yield staged
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_staging, staged)


async def _dry_run(
    kernel: Kernel,
    plan: ArchivePlan,
    data: bytes,
    parent: Path,
    rec: PluginRecord | None,
    existing: bool,
) -> InstallResult:
    """Report what installing would do; install and register nothing, and write nothing
    but the staging directory of a package it imports."""
    name, manifest = plan.name, plan.manifest
    allowed = kernel.settings.allow_pip_install
    missing = await anyio.to_thread.run_sync(missing_requirements, manifest.dependencies)
    deps = DependencyStatus(tuple(manifest.dependencies), tuple(missing), allowed)
    result = InstallResult(
        manifest=manifest,
        name=name,
        installed=False,
        enabled=False,
        conflicts=(),
        dry_run=True,
        replaced=existing,
        plugin=kernel.plugins.info(name) if rec is not None else None,
        dependencies=deps,
    )
    if missing:
        if not allowed:
            deps = attrs.evolve(deps, problem=_pip_disabled(name, missing).message)
        else:
            try:
                would = await resolve_requirements(missing, pip_args=kernel.config.pip_args)
                deps = attrs.evolve(deps, would_install=tuple(would))
            except InstallError as exc:
                deps = attrs.evolve(deps, problem=exc.message)
        # Importing it would fail (or, worse, pass by luck) without its dependencies.
        reason = (
            f"the package was not imported: its dependencies {', '.join(missing)} are not "
            "installed, and a dry run installs nothing"
        )
        return attrs.evolve(result, dependencies=deps, conflicts_unknown=reason)
    async with _staging(plan, data, parent) as staged:
        preview, registry = await _staged_preview(kernel, name, manifest, staged, rec)
    return attrs.evolve(result, conflicts=preview, registry_conflicts=registry)


async def _install(
    kernel: Kernel,
    name: str,
    manifest: PluginManifest,
    staged: Path,
    target: Path,
    rec: PluginRecord | None,
    *,
    enable: bool,
    overwrite: bool,
) -> tuple[DependencyStatus, tuple[CommandConflict, ...], tuple[RegistryConflict, ...]]:
    """Install the missing dependencies, check the staged package, move it into place.

    If anything fails after pip ran, the distributions it added are uninstalled again.
    """
    allowed = kernel.settings.allow_pip_install
    missing = await anyio.to_thread.run_sync(missing_requirements, manifest.dependencies)
    if missing and not allowed:
        raise _pip_disabled(name, missing)
    deps = DependencyStatus(tuple(manifest.dependencies), tuple(missing), allowed)
    if not missing:
        preview, registry = await _staged_preview(kernel, name, manifest, staged, rec)
        await _put_in_place(kernel, name, staged, target, enable=enable, overwrite=overwrite)
        return deps, preview, registry
    pip_args = kernel.config.pip_args
    before = await anyio.to_thread.run_sync(installed_distributions)
    planned: frozenset[str] = frozenset()
    try:
        # Resolved first (nothing is installed unless all of them resolve), then
        # installed before the package is imported, since it may import them.
        would = await resolve_requirements(missing, pip_args=pip_args)
        planned = frozenset(n.partition("==")[0] for n in would)
        await install_requirements(missing, pip_args=pip_args, resolved=True)
        after = await anyio.to_thread.run_sync(installed_distributions)
        added, changed = changed_distributions(before, after)
        if changed:
            kernel.log.warning("installing %s for plugin %r changed %s", missing, name, changed)
        ours = sorted((n, v) for n, v in added.items() if n in planned)
        deps = attrs.evolve(deps, installed=tuple(f"{n}=={v}" for n, v in ours))
        preview, registry = await _staged_preview(kernel, name, manifest, staged, rec)
        await _put_in_place(kernel, name, staged, target, enable=enable, overwrite=overwrite)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _take_back(kernel, name, before, planned, exc)
        raise
    return deps, preview, registry


async def _take_back(
    kernel: Kernel,
    name: str,
    before: dict[str, str],
    planned: frozenset[str],
    exc: BaseException,
) -> None:
    """Uninstall what pip added since `before` of the distributions it `planned` to
    install; say so (and what it could not undo) in the message of `exc`, the error that
    failed the install."""
    after = await anyio.to_thread.run_sync(installed_distributions)
    added, changed = changed_distributions(before, after)
    # Another process (`nekobot plugins install` next to a running bot) may have added a
    # distribution meanwhile, for a plugin of its own: not this install's to take back.
    others = sorted(n for n in added if n not in planned)
    if others:
        kernel.log.warning(
            "failed install of plugin %r: left alone what pip did not install for it: %s",
            name,
            ", ".join(others),
        )
    added = {n: v for n, v in added.items() if n in planned}
    notes = []
    if added:
        listed = ", ".join(f"{n}=={v}" for n, v in sorted(added.items()))
        try:
            await uninstall_distributions(list(added))
            notes.append(f"the dependencies pip installed for it were uninstalled again: {listed}")
        except Exception as err:
            kernel.log.error("could not uninstall %s after a failed install: %s", listed, err)
            notes.append(f"uninstalling the dependencies installed for it failed: {err}")
    if changed:
        listed = ", ".join(f"{n} {old} -> {new}" for n, (old, new) in sorted(changed.items()))
        notes.append(f"pip changed installed versions, not restored: {listed}")
    if not notes:
        return
    note = "; ".join(notes)
    if isinstance(exc, NekoError):
        exc.message = f"{exc.message}; {note}"
        exc.args = (exc.message,)
    else:
        exc.add_note(note)
        kernel.log.error("install of plugin %r failed: %s", name, note)


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


async def _staged_preview(
    kernel: Kernel,
    name: str,
    manifest: PluginManifest,
    staged: Path,
    rec: PluginRecord | None,
) -> tuple[tuple[CommandConflict, ...], tuple[RegistryConflict, ...]]:
    """Import the staged package once; return the command conflicts and the registry
    conflicts (routes, channels, ...) that registering its contributions would cause.

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
        commands = kernel.commands.prepare(name, contributions.commands)
    except NekoError as exc:
        raise PluginLoadError(name, exc.message) from None
    preview = tuple(kernel.commands.preview(name, commands))
    return preview, _registry_conflicts(kernel, name, contributions)


def _registry_conflicts(
    kernel: Kernel, name: str, c: Contributions
) -> tuple[RegistryConflict, ...]:
    """The keys of `c` that another plugin holds in the kernel's owned registries.

    A key declared twice by the plugin itself is a load error, as on enable. The plugin's
    own current entries (an overwrite) are no conflict: a reload replaces them.
    """
    out = []
    for registry, items in registry_items(kernel, c):
        try:
            clashes = registry.clashes(name, items, replacing=True)
        except ContributionError as exc:
            raise PluginLoadError(name, str(exc)) from None
        out += [RegistryConflict(registry.kind, registry.label(k), e.owner) for k, e in clashes]
    return tuple(out)


def _import_staged(
    kernel: Kernel, name: str, manifest: PluginManifest, staged: Path
) -> Contributions:
    """Import the package at `staged` as `name`, collect its contributions, forget it."""
    loader = kernel.loader
    roots = loader.finder.roots
    previous = roots.get(name)
    candidate = PluginCandidate(name, PluginSource.USER, name, manifest, staged)
    try:
        imported = import_generation(loader, candidate)
        try:
            pm = new_plugin_manager()  # the kernel's own must not see the staged module
            return register_generation(pm, imported.module, f"{name}#staged", name)[1]
        finally:
            imported.rollback()
    finally:
        if previous is None:
            roots.pop(name, None)
        else:
            roots[name] = previous


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
            os.rename(staged, target)
        except BaseException:
            if backup is not None:
                os.rename(backup, target)
            raise
    except OSError as exc:
        if not replace and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            # A concurrent install moved its files in since `lexists` looked.
            raise _exists(target.name, installed=False) from None
        raise InstallError(f"cannot move plugin into {target}: {exc.strerror or exc}") from None
    return backup


def _swap_back(staged: Path, target: Path, backup: Path | None) -> None:
    """Undo `_swap_in`: the new files go back to staging, the old ones return."""
    if os.path.lexists(target):
        os.rename(target, staged)
    if backup is not None:
        os.rename(backup, target)
