"""The plugin manager of one Kernel: discovery, and enable/disable/reload/delete.

Operations on one plugin are serialized by its lock. Loading is a transaction: a new
generation is imported and validated while the old one keeps serving; only then is
the old generation retired and the new one started, and if that start fails the old
generation is brought back.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import attrs
import pluggy

from kernel.calling import Contributions, call_impl, collect_contributions, impls_of
from kernel.commands import CommandEntry
from kernel.context import PluginContext
from kernel.errors import (
    EssentialPluginError,
    NekoError,
    PluginError,
    PluginLoadError,
    PluginNotFoundError,
    ReloadError,
)
from kernel.hookspecs import PROJECT, SPEC_MODULES, all_hook_names
from kernel.lifecycle import Gate, Scope
from kernel.loader import (
    ImportedGeneration,
    PluginCandidate,
    discover_builtins,
    discover_directory,
    discover_entry_points,
    shadows_module,
)
from kernel.manifest import check_compatible
from kernel.models import (
    CommandConflict,
    KernelEvent,
    OperationResult,
    PluginInfo,
    PluginSource,
    PluginState,
)
from kernel.plugin_config import validate_config

if TYPE_CHECKING:
    from kernel.kernel import Kernel

_STATE_SECTION = "plugins"
_CONFIG_SECTION = "plugin_config"
_HOOK_NAMES = frozenset(all_hook_names())


@attrs.define(eq=False)
class Generation:
    """One imported version of a plugin, with what it contributed and what it holds."""

    number: int
    pm_name: str
    imported: ImportedGeneration
    contributions: Contributions
    commands: list[CommandEntry]
    config_schema: Mapping[str, Any] | None
    hooks: tuple[str, ...]
    gate: Gate = attrs.field(factory=Gate)
    scope: Scope | None = None
    ctx: PluginContext | None = None


@attrs.define(eq=False)
class PluginRecord:
    """The kernel's mutable view of one plugin."""

    candidate: PluginCandidate
    log: logging.LoggerAdapter[logging.Logger]
    enabled: bool = True
    state: PluginState = PluginState.PENDING
    error: str | None = None
    generation: Generation | None = None
    loaded_at: float | None = None
    reload_count: int = 0
    generations: int = 0
    lock: anyio.Lock = attrs.field(factory=anyio.Lock)
    idle: anyio.Event = attrs.field(factory=anyio.Event)

    @property
    def name(self) -> str:
        """The plugin's name."""
        return self.candidate.name


class PluginManager:
    """Owns the plugins of one Kernel and every operation on them."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.pm = pluggy.PluginManager(PROJECT)
        for module in SPEC_MODULES:
            self.pm.add_hookspecs(module)
        self.records: dict[str, PluginRecord] = {}
        #: hook name -> [(plugin, impl, generation)] of active generations, by plugin name.
        self.hook_index: dict[str, list[tuple[str, pluggy.HookImpl, Generation]]] = {}
        #: top-level module name -> plugin name, for attributing stack frames.
        self.module_owners: dict[str, str] = {}
        self._stopping = False

    # -- discovery ---------------------------------------------------------------------

    def discover(self) -> list[PluginCandidate]:
        """Every plugin candidate the kernel's configuration makes visible (blocking I/O)."""
        from builtin_plugins import BUILTIN_PLUGINS, ESSENTIAL_PLUGINS

        config = self.kernel.config
        names = BUILTIN_PLUGINS if config.builtin_plugins is None else config.builtin_plugins
        found = discover_builtins(names, ESSENTIAL_PLUGINS)
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
        stored = await self.kernel.storage.state_items(_STATE_SECTION)
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
        for rec in order:
            if rec.enabled and rec.candidate.problem is None:
                async with rec.lock:
                    with contextlib.suppress(NekoError):  # recorded on the record, logged
                        await self._load(rec)
        self.kernel.log.info(
            "%d plugins active, %d failed",
            sum(r.state is PluginState.ACTIVE for r in self.records.values()),
            sum(r.state is PluginState.FAILED for r in self.records.values()),
        )

    async def rescan(self) -> list[str]:
        """Pick up plugins that appeared in plugin directories; return the new names."""
        candidates = await anyio.to_thread.run_sync(self.discover)
        stored = await self.kernel.storage.state_items(_STATE_SECTION)
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
        # Last loaded first; essential plugins (the API core) last of all.
        for rec in sorted(active, key=lambda r: (r.candidate.essential, -(r.loaded_at or 0))):
            async with rec.lock:
                await self._unload(rec, forget_modules=True, transfer=False)

    # -- reading -----------------------------------------------------------------------

    def record(self, name: str) -> PluginRecord:
        """The record of `name`, or PluginNotFoundError."""
        rec = self.records.get(name)
        if rec is None:
            raise PluginNotFoundError(name)
        return rec

    def info(self, name: str) -> PluginInfo:
        """A snapshot of one plugin."""
        rec = self.record(name)
        cand, gen = rec.candidate, rec.generation
        manifest = cand.manifest
        routes: tuple[str, ...] = ()
        if gen is not None:
            routes = tuple(
                sorted(
                    {
                        f"{m} {r.path}" if not r.websocket else f"WS {r.path}"
                        for r in gen.contributions.routes
                        for m in (r.methods if not r.websocket else ("WS",))
                    }
                )
            )
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
            commands=tuple(e.qualified for e in gen.commands) if gen else (),
            routes=routes,
            hooks=gen.hooks if gen else (),
            loaded_at=rec.loaded_at,
            reload_count=rec.reload_count,
            path=str(cand.path) if cand.path else None,
        )

    def infos(self) -> list[PluginInfo]:
        """Snapshots of every plugin, by name."""
        return [self.info(n) for n in sorted(self.records)]

    def conflicts_of(self, name: str) -> tuple[CommandConflict, ...]:
        """The command conflicts a plugin takes part in."""
        return tuple(
            c for c in self.kernel.commands.conflicts() if any(p == name for p, _ in c.candidates)
        )

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
        return OperationResult(self.info(name), self.conflicts_of(name))

    async def disable(self, name: str) -> OperationResult:
        """Stop a plugin, withdraw everything it contributed and remember it as disabled."""
        rec = self.record(name)
        if rec.candidate.essential:
            raise EssentialPluginError(name, f"plugin {name!r} is essential and cannot be disabled")
        async with self._operation(rec):
            changed = rec.enabled or rec.generation is not None
            if rec.generation is not None:
                await self._unload(rec, forget_modules=True, transfer=True)
            rec.state = PluginState.DISPOSED if rec.candidate.problem is None else rec.state
            rec.enabled = False
            await self._persist_enabled(rec)
        if changed:
            await self.kernel.emit(KernelEvent("plugin.disabled", {"name": name}, plugin=name))
        return OperationResult(self.info(name), (), changed)

    async def reload(self, name: str) -> OperationResult:
        """Replace a plugin with a freshly imported generation, transactionally.

        On failure the previous generation keeps serving and ReloadError says why.
        A plugin that is not active is loaded as by `enable` (without changing `enabled`).
        """
        rec = self.record(name)
        async with self._operation(rec):
            await self._refresh_candidate(rec)
            if rec.candidate.problem:
                await self._emit_failed(rec, rec.candidate.problem)
                raise ReloadError(name, rec.candidate.problem)
            if rec.generation is None:
                await self._load(rec)
            else:
                try:
                    await self._load(rec, replacing=rec.generation)
                except NekoError as exc:
                    await self._emit_failed(rec, str(exc))
                    raise ReloadError(
                        name, f"reload of {name!r} failed, previous version kept: {exc.message}"
                    ) from exc
            rec.reload_count += 1
        await self.kernel.emit(KernelEvent("plugin.reloaded", {"name": name}, plugin=name))
        return OperationResult(self.info(name), self.conflicts_of(name))

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
            if rec.generation is not None:
                await self._unload(rec, forget_modules=True, transfer=True)
            info = attrs.evolve(self.info(name), state=PluginState.DISPOSED, enabled=False)
            path = rec.candidate.path
            if path is not None:
                await anyio.to_thread.run_sync(shutil.rmtree, path, True)
            await self.kernel.storage.state_delete(_STATE_SECTION, name)
            if not keep_data:
                await self.kernel.storage.state_delete(_CONFIG_SECTION, name)
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
            if rec.generation is not None:
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
        stored = await self.kernel.storage.state_get(_CONFIG_SECTION, name, {})
        if rec.generation is not None and rec.generation.ctx is not None:
            return dict(rec.generation.ctx.config)
        from kernel.plugin_config import with_defaults

        return with_defaults(self.config_schema(name), stored)

    async def set_config(self, name: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Validate, store and apply a plugin's configuration (live, or by a reload)."""
        rec = self.record(name)
        async with self._operation(rec):
            full = validate_config(self.config_schema(name), config)
            previous = await self.kernel.storage.state_get(_CONFIG_SECTION, name)
            await self.kernel.storage.state_set(_CONFIG_SECTION, name, dict(config))
            gen = rec.generation
            if gen is not None and gen.ctx is not None:
                if "nekobot_config_changed" in gen.hooks:
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
                else:
                    try:
                        await self._load(rec, replacing=gen)
                    except NekoError:
                        # The plugin refused this configuration: keep the one that worked.
                        # The old generation was restarted with the refused one, so it may
                        # be down; bring it back with its own.
                        if previous is None:
                            await self.kernel.storage.state_delete(_CONFIG_SECTION, name)
                        else:
                            await self.kernel.storage.state_set(_CONFIG_SECTION, name, previous)
                        if rec.generation is None:
                            with contextlib.suppress(NekoError):
                                await self._load(rec)
                        raise
        await self.kernel.emit(KernelEvent("plugin.config_changed", {"name": name}, plugin=name))
        return full

    # -- the transaction ------------------------------------------------------------------

    def _operation(self, rec: PluginRecord) -> _Operation:
        return _Operation(rec)

    async def _refresh_candidate(self, rec: PluginRecord) -> None:
        """Re-read a plugin's manifest from disk before a reload (it may have changed)."""
        cand = rec.candidate
        if cand.source is not PluginSource.USER or cand.path is None:
            return
        fresh = await anyio.to_thread.run_sync(discover_directory, cand.path.parent)
        for new in fresh:
            if new.name == cand.name:
                if new.problem is None and rec.generation is None and shadows_module(new.name):
                    # As in `discover`: importing it would replace that module everywhere.
                    new = attrs.evolve(
                        new,
                        problem=f"plugin name {new.name!r} would shadow an importable "
                        "module; rename the plugin",
                    )
                rec.candidate = new
                return
        rec.candidate = attrs.evolve(cand, problem=f"plugin directory {cand.path} is gone")

    async def _load(self, rec: PluginRecord, replacing: Generation | None = None) -> None:
        """Import, validate, swap in and start a generation; a failure changes nothing."""
        name = rec.name
        if replacing is None:
            rec.state = PluginState.LOADING
        try:
            gen = await self._stage(rec)
        except NekoError as exc:
            if replacing is None:
                rec.state, rec.error = PluginState.FAILED, exc.message
                await self._emit_failed(rec, exc.message)
            rec.log.error("loading plugin %r failed: %s", name, exc.message)
            raise
        if replacing is not None:
            await self._retire(rec, replacing)
            self._commit_registries(rec, gen, replacing=True)
        else:
            self._commit_registries(rec, gen, replacing=False)
        try:
            await self._activate(rec, gen)
        except NekoError as exc:
            await self._deactivate(gen)
            self.pm.unregister(name=gen.pm_name)
            gen.imported.rollback()
            if replacing is not None:
                rec.log.error(
                    "new generation of %r failed to start (%s); restoring the previous one",
                    name,
                    exc.message,
                )
                await self._restore(rec, replacing)
            else:
                self._drop_registries(name, transfer=True)
                self.kernel.loader.forget(rec.candidate)
                rec.generation = None
                rec.state, rec.error = PluginState.FAILED, exc.message
                self._reindex()
                await self._emit_failed(rec, exc.message)
            raise
        gen.imported.commit()
        rec.generation = gen
        rec.state, rec.error = PluginState.ACTIVE, None
        rec.loaded_at = time.time()
        self._reindex()
        await self.kernel.persist_commands()

    async def _stage(self, rec: PluginRecord) -> Generation:
        """Import a new generation and check its contributions; nothing is committed."""
        name, cand = rec.name, rec.candidate
        if cand.manifest is not None:
            try:
                check_compatible(cand.manifest)
            except NekoError as exc:
                raise PluginLoadError(name, exc.message) from None
        try:
            imported = await anyio.to_thread.run_sync(
                lambda: self.kernel.loader.import_plugin(cand, fresh=True)
            )
        except Exception as exc:
            raise PluginLoadError(name, f"import failed: {type(exc).__name__}: {exc}") from exc
        rec.generations += 1
        pm_name = f"{name}#{rec.generations}"
        try:
            try:
                self.pm.register(_registrable(self.pm, imported.module), name=pm_name)
            except Exception as exc:
                raise PluginLoadError(name, f"invalid hook implementation: {exc}") from None
            hooks = self._hooks_of(pm_name)
            named = [
                a
                for a in dir(imported.module)
                if a.startswith("nekobot_") and callable(getattr(imported.module, a))
            ]
            unknown = [a for a in named if a not in _HOOK_NAMES]
            if unknown:
                raise PluginLoadError(name, f"unknown hook(s) {', '.join(unknown)}")
            unmarked = [a for a in named if a not in hooks]
            if unmarked:
                raise PluginLoadError(name, f"{', '.join(unmarked)} not marked with @hookimpl")
            contributions = collect_contributions(self.pm, pm_name, name)
            schema = contributions.config_schema or (
                cand.manifest.config_schema if cand.manifest else None
            )
            gen = Generation(rec.generations, pm_name, imported, contributions, [], schema, hooks)
            gen.commands = self.kernel.commands.prepare(name, contributions.commands, gen)
            self._check_registries(name, contributions, replacing=rec.generation is not None)
        except NekoError as exc:
            if self.pm.get_plugin(pm_name) is not None:
                self.pm.unregister(name=pm_name)
            imported.rollback()
            if isinstance(exc, PluginError):
                raise
            raise PluginLoadError(name, exc.message) from exc
        except BaseException:
            if self.pm.get_plugin(pm_name) is not None:
                self.pm.unregister(name=pm_name)
            imported.rollback()
            raise
        return gen

    def _hooks_of(self, pm_name: str) -> tuple[str, ...]:
        plugin = self.pm.get_plugin(pm_name)
        callers = self.pm.get_hookcallers(plugin) or []
        return tuple(sorted(c.name for c in callers))

    def _check_registries(self, name: str, c: Contributions, *, replacing: bool) -> None:
        k = self.kernel
        k.routes.check(name, _route_items(c), replacing=replacing)
        k.middleware.check(name, c.middleware, replacing=replacing)
        k.channels.check(name, c.channels, replacing=replacing)
        k.platform_types.check(name, c.platform_types, replacing=replacing)
        k.provider_types.check(name, c.provider_types, replacing=replacing)
        k.mcp_servers.check(name, c.mcp_servers, replacing=replacing)

    def _commit_registries(self, rec: PluginRecord, gen: Generation, *, replacing: bool) -> None:
        k, c, name = self.kernel, gen.contributions, rec.name
        if replacing:
            k.commands.replace_owner(name, gen.commands)
        else:
            k.commands.add(name, gen.commands)
        for registry, items in (
            (k.routes, _route_items(c)),
            (k.middleware, c.middleware),
            (k.channels, c.channels),
            (k.platform_types, c.platform_types),
            (k.provider_types, c.provider_types),
            (k.mcp_servers, c.mcp_servers),
        ):
            registry.replace_owner(name, items, gen)  # type: ignore[arg-type]
        top = rec.candidate.module.partition(".")[0]
        self.module_owners[rec.candidate.module if top == "builtin_plugins" else top] = name
        k.asgi_app.rebuild()

    def _drop_registries(self, name: str, *, transfer: bool) -> None:
        k = self.kernel
        k.commands.drop_owner(name, transfer=transfer)
        for registry in (
            k.routes,
            k.middleware,
            k.channels,
            k.platform_types,
            k.provider_types,
            k.mcp_servers,
        ):
            registry.drop_owner(name)
        for module, owner in list(self.module_owners.items()):
            if owner == name:
                del self.module_owners[module]
        k.asgi_app.rebuild()

    async def _activate(self, rec: PluginRecord, gen: Generation) -> None:
        """Give the generation a scope and context, run its start hook, open its gate."""
        k = self.kernel
        scope = Scope(rec.name, k.task_group, rec.log, step_timeout=k.config.hook_timeout)
        stored = await k.storage.state_get(_CONFIG_SECTION, rec.name, {})
        try:
            config = validate_config(gen.config_schema, stored)
        except NekoError as exc:
            raise PluginLoadError(
                rec.name, f"stored configuration is invalid: {exc.message}"
            ) from None
        gen.scope = scope
        gen.ctx = PluginContext(k, rec.name, scope, config, rec.log)
        rec.generation = gen
        impls = impls_of(self.pm, "nekobot_plugin_start", gen.pm_name)
        for impl in impls:
            outcome = await call_impl(
                impl,
                {"ctx": gen.ctx},
                plugin=rec.name,
                hook="nekobot_plugin_start",
                timeout=k.config.hook_timeout,
                log=rec.log,
            )
            if outcome.error is not None:
                err = outcome.error
                detail = (
                    "timed out"
                    if isinstance(err, TimeoutError)
                    else (f"{type(err).__name__}: {err}")
                )
                raise PluginLoadError(rec.name, f"nekobot_plugin_start failed: {detail}")
        gen.gate.open()

    async def _deactivate(self, gen: Generation) -> None:
        """Close the gate (waiting for calls in flight), run the stop hook, dispose the scope."""
        k = self.kernel
        await gen.gate.close(k.config.handler_timeout)
        if gen.ctx is not None and gen.scope is not None and not gen.scope.closed:
            for impl in impls_of(self.pm, "nekobot_plugin_stop", gen.pm_name):
                await call_impl(
                    impl,
                    {"ctx": gen.ctx},
                    plugin=gen.ctx.name,
                    hook="nekobot_plugin_stop",
                    timeout=k.config.hook_timeout,
                    log=gen.ctx.log,
                )
        if gen.scope is not None:
            await gen.scope.dispose()

    async def _retire(self, rec: PluginRecord, gen: Generation) -> None:
        """Take the serving generation down before a swap (its entries stay until replaced)."""
        rec.state = PluginState.UNLOADING
        await self._deactivate(gen)
        self.pm.unregister(name=gen.pm_name)

    async def _restore(self, rec: PluginRecord, old: Generation) -> None:
        """Bring a retired generation back after its successor failed to start."""
        restored = Generation(
            old.number,
            old.pm_name,
            old.imported,
            old.contributions,
            [],
            old.config_schema,
            old.hooks,
        )
        # The old entries point at the retired generation, whose gate stays closed.
        restored.commands = [attrs.evolve(e, generation=restored) for e in old.commands]
        self.pm.register(old.imported.module, name=old.pm_name)
        self._commit_registries(rec, restored, replacing=True)
        try:
            await self._activate(rec, restored)
        except NekoError as exc:
            await self._deactivate(restored)
            self.pm.unregister(name=restored.pm_name)
            self._drop_registries(rec.name, transfer=False)
            rec.generation = None
            rec.state, rec.error = PluginState.FAILED, exc.message
            self._reindex()
            return
        rec.generation = restored
        rec.state = PluginState.ACTIVE
        self._reindex()

    async def _unload(self, rec: PluginRecord, *, forget_modules: bool, transfer: bool) -> None:
        """Take a plugin down completely."""
        gen = rec.generation
        if gen is None:
            return
        rec.state = PluginState.UNLOADING
        await self._deactivate(gen)
        self.pm.unregister(name=gen.pm_name)
        self._drop_registries(rec.name, transfer=transfer)
        rec.generation = None
        rec.state = PluginState.DISPOSED
        if forget_modules:
            self.kernel.loader.forget(rec.candidate)
        self._reindex()
        if transfer and not self._stopping:
            await self.kernel.persist_commands()

    def _reindex(self) -> None:
        index: dict[str, list[tuple[str, pluggy.HookImpl, Generation]]] = {}
        for name in sorted(self.records):
            gen = self.records[name].generation
            if gen is None:
                continue
            for hook in gen.hooks:
                for impl in impls_of(self.pm, hook, gen.pm_name):
                    index.setdefault(hook, []).append((name, impl, gen))
        self.hook_index = index

    async def _persist_enabled(self, rec: PluginRecord) -> None:
        await self.remember_enabled(rec.name, rec.enabled)

    async def remember_enabled(self, name: str, enabled: bool) -> None:
        """Store whether `name` is enabled (also for a plugin not discovered yet)."""
        await self.kernel.storage.state_set(_STATE_SECTION, name, {"enabled": enabled})

    async def _emit_failed(self, rec: PluginRecord, error: str) -> None:
        await self.kernel.emit(
            KernelEvent("plugin.failed", {"name": rec.name, "error": error}, plugin=rec.name)
        )


class _Operation:
    """Serializes operations on one plugin and marks it busy while one runs."""

    def __init__(self, rec: PluginRecord) -> None:
        self.rec = rec

    async def __aenter__(self) -> None:
        await self.rec.lock.acquire()
        self.rec.idle = anyio.Event()

    async def __aexit__(self, *exc_info: object) -> None:
        self.rec.idle.set()
        self.rec.lock.release()


def _registrable(pm: pluggy.PluginManager, module: ModuleType) -> ModuleType:
    """`module`, or a copy of its namespace if it is registered already.

    A builtin is imported once, so its next generation is the same module object,
    which pluggy refuses to register twice while the old generation still serves.
    """
    if not pm.is_registered(module):
        return module
    copy = ModuleType(module.__name__)
    copy.__dict__.update(vars(module))
    return copy


def _route_items(c: Contributions) -> list[tuple[tuple[str, str], Any]]:
    items = []
    for route in c.routes:
        methods: Iterable[str] = ("WS",) if route.websocket else route.methods
        for method in methods:
            items.append(((route.path, method.upper()), route))
    return items
