"""The plugin manager of one Kernel: discovery, and enable/disable/reload/delete.

Operations on one plugin are serialized by its lock; the generation swap they rely on
lives in `kernel.generations`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import attrs
import pluggy

from kernel.calling import call_impl, impls_of
from kernel.contributions import TOOLS
from kernel.dependencies import (
    Declarations,
    DependencyGraph,
    MissingServiceError,
    read_declarations,
)
from kernel.errors import (
    EssentialPluginError,
    NekoError,
    PluginLoadError,
    PluginNotFoundError,
    ReloadError,
)
from kernel.generations import (
    CONFIG_SECTION,
    STATE_SECTION,
    Generation,
    GenerationOps,
    PluginRecord,
)
from kernel.loader import (
    PluginCandidate,
    discover_builtins,
    discover_directory,
    discover_entry_points,
    registered_builtins,
    shadows_module,
)
from kernel.models import (
    CommandConflict,
    KernelEvent,
    OperationResult,
    PluginInfo,
    PluginSource,
    PluginState,
    ReloadFailure,
)
from kernel.plugin_config import validate_config, with_defaults
from kernel.reload import plugin_files
from kernel.services import service_name
from kernel.staging import new_plugin_manager

if TYPE_CHECKING:
    from kernel.kernel import Kernel


class PluginManager(GenerationOps):
    """Owns the plugins of one Kernel and every operation on them."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.pm = new_plugin_manager()
        self.records: dict[str, PluginRecord] = {}
        #: hook name -> [(plugin, impl, generation)] of active generations, by plugin name.
        self.hook_index: dict[str, list[tuple[str, pluggy.HookImpl, Generation]]] = {}
        #: top-level module name -> plugin name, for attributing stack frames.
        self.module_owners: dict[str, str] = {}
        self._stopping = False
        self._infos_cache: tuple[tuple[Any, ...], list[PluginInfo]] | None = None
        self.deps = DependencyGraph(kernel.services, self._declarations_of)

    # -- discovery ---------------------------------------------------------------------

    def discover(self) -> list[PluginCandidate]:
        """Every plugin candidate the kernel's configuration makes visible (blocking I/O)."""
        config = self.kernel.config
        names = config.builtin_plugins
        found: list[PluginCandidate] = []
        if names is None or names:  # an empty selection needs no package metadata
            builtins = registered_builtins() if config.builtins is None else config.builtins
            found = discover_builtins(builtins, names)
        if config.entry_points:
            found.extend(discover_entry_points())
        for directory in config.plugin_dirs:
            found.extend(discover_directory(directory))
        unique: dict[str, PluginCandidate] = {}
        for cand in found:
            if cand.name in unique:
                first = unique[cand.name]
                unique[cand.name] = first if first.problem is None else cand
                self.kernel.log.warning(
                    "plugin %r found twice (%s and %s); using the first",
                    cand.name,
                    first.source.value,
                    cand.source.value,
                )
                continue
            if cand.source is PluginSource.USER and cand.problem is None:
                active = self.records.get(cand.name)
                if (active is None or active.generation is None) and shadows_module(cand.name):
                    cand = attrs.evolve(
                        cand,
                        problem=f"plugin name {cand.name!r} would shadow an importable "
                        "module; rename the plugin",
                    )
            unique[cand.name] = cand
        return list(unique.values())

    def _new_record(self, cand: PluginCandidate, enabled: bool) -> PluginRecord:
        logger = logging.getLogger(f"nekobot.plugins.{cand.name}")
        log = logging.LoggerAdapter(logger, {"plugin": cand.name, "nekobot_kernel": self.kernel.id})
        rec = PluginRecord(cand, log, enabled=enabled)
        rec.idle.set()
        if cand.problem:
            rec.state, rec.error = PluginState.FAILED, cand.problem
        return rec

    async def start(self) -> None:
        """Discover plugins and enable those that are (or by default would be) enabled."""
        candidates = await anyio.to_thread.run_sync(self.discover)
        stored = await self.kernel.storage.state_items(STATE_SECTION)
        for cand in candidates:
            enabled = bool(stored.get(cand.name, {}).get("enabled", True)) or cand.essential
            self.records[cand.name] = self._new_record(cand, enabled)
        order = sorted(
            self.records.values(),
            key=lambda r: (
                not r.candidate.essential,
                r.candidate.source is not PluginSource.BUILTIN,
                r.name,
            ),
        )
        await self._start_in_order([r for r in order if r.enabled and r.candidate.problem is None])
        self.kernel.log.info(
            "%d plugins active, %d failed",
            sum(r.state is PluginState.ACTIVE for r in self.records.values()),
            sum(r.state is PluginState.FAILED for r in self.records.values()),
        )

    async def rescan(self) -> list[str]:
        """Pick up plugins that appeared in plugin directories; return the new names."""
        candidates = await anyio.to_thread.run_sync(self.discover)
        stored = await self.kernel.storage.state_items(STATE_SECTION)
        added = []
        for cand in candidates:
            rec = self.records.get(cand.name)
            if rec is None:
                enabled = bool(stored.get(cand.name, {}).get("enabled", True))
                self.records[cand.name] = self._new_record(cand, enabled=enabled)
                added.append(cand.name)
            elif rec.generation is None and rec.candidate != cand:
                rec.candidate = cand
                if cand.problem is None and rec.state is PluginState.FAILED:
                    rec.state, rec.error = PluginState.PENDING, None
        return added

    async def shutdown(self) -> None:
        """Retire every active plugin, last loaded first; persisted state is not touched."""
        self._stopping = True
        active = [r for r in self.records.values() if r.generation is not None]
        # Last loaded first; essential plugins (the API core) last of all; and every
        # consumer of a service before its provider.
        active.sort(key=lambda r: (r.candidate.essential, -(r.loaded_at or 0)))
        for name in self.deps.stop_order([r.name for r in active]):
            rec = self.records[name]
            # An operation, so that service calls wait for it and then fail as "gone".
            async with self._operation(rec):
                await self._unload(rec, forget_modules=True, transfer=False)

    # -- service requirements ----------------------------------------------------------

    def _declarations_of(self, name: str) -> Declarations | None:
        rec = self.records.get(name)
        if rec is None or rec.generation is None:
            return None
        return read_declarations(name, rec.generation.imported.module)

    def busy(self, name: str) -> bool:
        """Whether an operation is running on `name` (its services may come back)."""
        rec = self.records.get(name)
        return rec is not None and not rec.idle.is_set()

    def _check_requirements(self, rec: PluginRecord, gen: Generation) -> None:
        """Before a staged generation replaces anything: its `requires` must be served.

        A plugin that is not active yet is remembered as waiting, and started by
        `_start_waiting` once a provider serves what it requires.
        """
        decl = read_declarations(rec.name, gen.imported.module)
        try:
            self.deps.check(rec.name, decl, self.records, replacing=rec.generation is not None)
        except MissingServiceError:
            if rec.generation is None:
                self.deps.waiting[rec.name] = decl
            raise
        self.deps.waiting.pop(rec.name, None)

    async def _start_in_order(self, queue: list[PluginRecord]) -> None:
        """Load the plugins of `queue`, each after the providers of what it requires: one
        whose requirements are not served is put back and tried again after a success."""
        queue = list(queue)
        progressed = True
        while queue and progressed:
            progressed = False
            for rec in list(queue):
                decl = self.deps.waiting.get(rec.name)
                if decl is not None and self.deps.missing(decl):
                    continue  # nothing it needs has come: no point importing it again
                queue.remove(rec)
                async with self._operation(rec):
                    if rec.generation is not None or not rec.enabled:
                        continue
                    try:
                        await self._load(rec)
                    except MissingServiceError:
                        queue.append(rec)
                        continue
                    except NekoError:  # recorded on the record, logged
                        continue
                progressed = True
        for rec in queue:
            decl = self.deps.waiting.get(rec.name)
            if decl is None:
                continue
            # Said again now that every plugin was tried: a provider that was not
            # imported yet at the first attempt may be waiting too (a cycle).
            try:
                self.deps.check(rec.name, decl, self.records)
            except MissingServiceError as exc:
                rec.error = exc.message
            rec.state = PluginState.PENDING
            rec.log.warning("plugin %r is waiting: %s", rec.name, rec.error)

    async def _start_waiting(self) -> None:
        """Start the enabled plugins waiting for a service that may be served now."""
        queue = [
            rec
            for name in sorted(self.deps.waiting)
            if (rec := self.records.get(name)) is not None
            and rec.enabled
            and rec.generation is None
        ]
        if queue:
            await self._start_in_order(queue)

    async def _stop_dependents(self, provider: str) -> None:
        """Stop the active plugins requiring a service of `provider` (their own consumers
        first) before it goes away for good; they wait for it to come back."""
        active = [n for n, r in self.records.items() if r.generation is not None]
        for name in self.deps.dependents(provider, active):
            rec = self.records[name]
            async with self._operation(rec):
                decl = self.deps.declared(name)
                if rec.generation is None or decl is None:
                    continue
                await self._stop_dependents(name)
                keys = set(self.kernel.services.provided_by(provider))
                needed = ", ".join(service_name(k) for k in decl.requires if k in keys)
                await self._unload(rec, forget_modules=True, transfer=False)
                self.deps.waiting[name] = decl
                rec.state = PluginState.PENDING
                rec.error = (
                    f"stopped: plugin {provider!r}, which provides {needed}, went away; "
                    "it starts again once that is served"
                )
                rec.log.warning("plugin %r %s", name, rec.error)
            await self._emit_failed(rec, rec.error)

    # -- reading -----------------------------------------------------------------------

    def record(self, name: str) -> PluginRecord:
        """The record of `name`, or PluginNotFoundError."""
        rec = self.records.get(name)
        if rec is None:
            raise PluginNotFoundError(name)
        return rec

    def info(self, name: str, conflicts: tuple[CommandConflict, ...] | None = None) -> PluginInfo:
        """A snapshot of one plugin (`conflicts`: every conflict, if already at hand)."""
        rec = self.record(name)
        if conflicts is None:
            conflicts = tuple(self.kernel.commands.conflicts())
        cand, gen = rec.candidate, rec.generation
        manifest = cand.manifest
        routes = gen.route_labels if gen is not None else ()
        return PluginInfo(
            name=rec.name,
            version=manifest.version if manifest else "",
            description=manifest.description if manifest else "",
            author=manifest.author if manifest else "",
            source=cand.source,
            essential=cand.essential,
            enabled=rec.enabled,
            state=rec.state,
            error=rec.error,
            commands=tuple(e.qualified for e in self.kernel.commands.owned_by(name)) if gen else (),
            routes=routes,
            hooks=gen.hooks if gen else (),
            loaded_at=rec.loaded_at,
            reload_count=rec.reload_count,
            path=str(cand.path) if cand.path else None,
            tools=TOOLS.labels(gen.contributions.of(TOOLS)) if gen else (),
            last_reload_error=rec.last_reload_error,
            conflicts=_taking_part(conflicts, name),
        )

    def infos(self) -> list[PluginInfo]:
        """Snapshots of every plugin, by name (rebuilt only when a plugin changed)."""
        commands = self.kernel.commands
        fingerprint = (
            commands.version,  # conflicts change with any plugin's commands
            *(
                (
                    n,
                    r.state,
                    r.enabled,
                    r.error,
                    r.generation,
                    r.loaded_at,
                    r.reload_count,
                    r.last_reload_error,
                )
                for n, r in sorted(self.records.items())
            ),
        )
        if self._infos_cache is None or self._infos_cache[0] != fingerprint:
            conflicts = tuple(commands.conflicts())
            infos = [self.info(n, conflicts) for n in sorted(self.records)]
            self._infos_cache = (fingerprint, infos)
        return list(self._infos_cache[1])

    def conflicts_of(self, name: str) -> tuple[CommandConflict, ...]:
        """The command conflicts a plugin takes part in."""
        return _taking_part(self.kernel.commands.conflicts(), name)

    async def settled(self, name: str) -> None:
        """Wait until no operation is running on `name`."""
        rec = self.records.get(name)
        if rec is not None:
            await rec.idle.wait()

    # -- operations ----------------------------------------------------------------------

    async def enable(self, name: str) -> OperationResult:
        """Load and start a plugin and remember it as enabled."""
        rec = self.record(name)
        async with self._operation(rec):
            if rec.generation is not None:
                changed = not rec.enabled
                rec.enabled = True
                await self._persist_enabled(rec)
                return OperationResult(self.info(name), self.conflicts_of(name), changed)
            await self._refresh_candidate(rec)  # its files may have been fixed meanwhile
            if rec.candidate.problem:
                rec.state, rec.error = PluginState.FAILED, rec.candidate.problem
                raise PluginLoadError(name, rec.candidate.problem)
            await self._load(rec)
            rec.enabled = True
            await self._persist_enabled(rec)
        await self.kernel.emit(KernelEvent("plugin.enabled", {"name": name}, plugin=name))
        await self._start_waiting()
        return OperationResult(self.info(name), self.conflicts_of(name))

    async def disable(self, name: str) -> OperationResult:
        """Stop a plugin, withdraw everything it contributed and remember it as disabled."""
        rec = self.record(name)
        if rec.candidate.essential:
            raise EssentialPluginError(name, f"plugin {name!r} is essential and cannot be disabled")
        async with self._operation(rec):
            changed = rec.enabled or rec.generation is not None
            self.deps.waiting.pop(name, None)
            if rec.generation is not None:
                await self._stop_dependents(name)
                await self._unload(rec, forget_modules=True, transfer=True)
            rec.state = PluginState.DISPOSED if rec.candidate.problem is None else rec.state
            rec.enabled = False
            await self._persist_enabled(rec)
        if changed:
            await self.kernel.emit(KernelEvent("plugin.disabled", {"name": name}, plugin=name))
        return OperationResult(self.info(name), (), changed)

    async def reload(self, name: str, *, if_changed: bool = False) -> OperationResult:
        """Replace a plugin with a freshly imported generation, transactionally.

        On failure the previous generation keeps serving and ReloadError says why.
        A plugin that is not active is loaded as by `enable` (without changing `enabled`).
        With `if_changed`, an active user plugin whose files are still those its
        generation was imported from is left as it is (`changed` False).
        """
        rec = self.record(name)
        async with self._operation(rec):
            gen = rec.generation
            if if_changed and gen is not None and gen.files is not None and rec.candidate.path:
                now = await anyio.to_thread.run_sync(plugin_files, rec.candidate.path)
                if now == gen.files:
                    return OperationResult(self.info(name), self.conflicts_of(name), False)
            try:
                await self._reload(rec)
            except NekoError as exc:
                # Shown on the plugin: `error` stays None while the old generation serves.
                rec.last_reload_error = ReloadFailure(exc.message, time.time())
                raise
        await self.kernel.emit(KernelEvent("plugin.reloaded", {"name": name}, plugin=name))
        await self._start_waiting()
        return OperationResult(self.info(name), self.conflicts_of(name))

    async def _reload(self, rec: PluginRecord) -> None:
        name = rec.name
        serving = rec.candidate
        await self._refresh_candidate(rec)
        if rec.candidate.problem:
            problem = rec.candidate.problem
            if rec.generation is not None:
                rec.candidate = serving  # the generation that keeps serving came from it
            await self._emit_failed(rec, problem)
            raise ReloadError(name, problem)
        if rec.generation is None:
            await self._load(rec)
        else:
            try:
                await self._load(rec, replacing=rec.generation)
            except NekoError as exc:
                if rec.generation is not None:
                    rec.candidate = serving
                await self._emit_failed(rec, str(exc))
                raise ReloadError(
                    name, f"reload of {name!r} failed, previous version kept: {exc.message}"
                ) from exc
        rec.reload_count += 1

    async def delete(self, name: str, *, keep_data: bool = False) -> OperationResult:
        """Remove a user plugin: dispose it, delete its files, and its data unless kept."""
        rec = self.record(name)
        if rec.candidate.source is not PluginSource.USER:
            raise EssentialPluginError(
                name,
                f"plugin {name!r} is {rec.candidate.source.value}; only user plugins "
                "can be deleted",
            )
        async with self._operation(rec):
            self.deps.waiting.pop(name, None)
            if rec.generation is not None:
                await self._stop_dependents(name)
                await self._unload(rec, forget_modules=True, transfer=True)
            info = attrs.evolve(self.info(name), state=PluginState.DISPOSED, enabled=False)
            path = rec.candidate.path
            if path is not None:
                await anyio.to_thread.run_sync(shutil.rmtree, path, True)
            await self.kernel.storage.state_delete(STATE_SECTION, name)
            if not keep_data:
                await self.kernel.storage.state_delete(CONFIG_SECTION, name)
                await self.kernel.storage.drop_plugin_data(name)
                await anyio.to_thread.run_sync(
                    shutil.rmtree, self.kernel.config.data_dir / "plugin_data" / name, True
                )
            del self.records[name]
        await self.kernel.emit(KernelEvent("plugin.deleted", {"name": name}, plugin=name))
        return OperationResult(info)

    async def forget_vanished(self, name: str) -> None:
        """A user plugin's directory disappeared: take it down and forget it (data kept)."""
        rec = self.record(name)
        async with self._operation(rec):
            self.deps.waiting.pop(name, None)
            if rec.generation is not None:
                await self._stop_dependents(name)
                await self._unload(rec, forget_modules=True, transfer=True)
            self.records.pop(name, None)
        await self.kernel.emit(KernelEvent("plugin.removed", {"name": name}, plugin=name))

    # -- configuration -----------------------------------------------------------------

    def config_schema(self, name: str) -> Mapping[str, Any] | None:
        """The JSON Schema of a plugin's configuration (from its active generation or manifest)."""
        rec = self.record(name)
        if rec.generation is not None:
            return rec.generation.config_schema
        return rec.candidate.manifest.config_schema if rec.candidate.manifest else None

    async def get_config(self, name: str) -> dict[str, Any]:
        """A plugin's stored configuration with schema defaults filled in."""
        rec = self.record(name)
        if rec.generation is not None and rec.generation.ctx is not None:
            return dict(rec.generation.ctx.config)
        stored = await self.kernel.storage.state_get(CONFIG_SECTION, name, {})
        return with_defaults(self.config_schema(name), stored)

    async def set_config(self, name: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Validate, store and apply a plugin's configuration (live, or by a reload)."""
        rec = self.record(name)
        async with self._operation(rec):
            full = validate_config(self.config_schema(name), config)
            gen = rec.generation
            if gen is not None and "nekobot_config_changed" not in gen.hooks:
                # Stored only once a generation started with it: a plugin that refuses it
                # keeps the previous generation and configuration (`_load` restores both).
                await self._load(rec, replacing=gen, config=full)
            await self.kernel.storage.state_set(CONFIG_SECTION, name, dict(config))
            if gen is not None and gen.ctx is not None and "nekobot_config_changed" in gen.hooks:
                gen.ctx.config = full
                impl = impls_of(self.pm, "nekobot_config_changed", gen.pm_name)[0]
                await call_impl(
                    impl,
                    {"ctx": gen.ctx, "config": full},
                    plugin=name,
                    hook="nekobot_config_changed",
                    timeout=self.kernel.config.hook_timeout,
                    log=rec.log,
                )
        await self.kernel.emit(KernelEvent("plugin.config_changed", {"name": name}, plugin=name))
        return full


def _taking_part(conflicts: Iterable[CommandConflict], name: str) -> tuple[CommandConflict, ...]:
    return tuple(c for c in conflicts if any(p == name for p, _ in c.candidates))
