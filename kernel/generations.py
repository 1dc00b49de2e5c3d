"""Plugin generations and the transaction that swaps them.

A generation is one imported version of a plugin. Loading one is a transaction: it
is imported and validated while the previous generation keeps serving; only then is the
previous one retired and the new one started, and if that start fails the previous
generation is brought back. `PluginManager` builds its public operations on this.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from contextvars import Token
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import attrs
import pluggy

from kernel.calling import call_impl, impls_of
from kernel.context import PluginContext
from kernel.contributions import ROUTES, Contributions
from kernel.dependencies import MissingServiceError
from kernel.errors import (
    NekoError,
    PluginError,
    PluginLoadError,
)
from kernel.hookspecs import PRIORITISED_HOOKS
from kernel.hookspecs.markers import priority_of
from kernel.lifecycle import Gate, Scope, begin_operation, end_operation
from kernel.loader import (
    ImportedGeneration,
    PluginCandidate,
    read_directory_plugin,
    shadows_module,
)
from kernel.manifest import check_compatible
from kernel.models import (
    KernelEvent,
    PluginSource,
    PluginState,
    ReloadFailure,
)
from kernel.plugin_config import validate_config
from kernel.reload import PluginFiles, plugin_files
from kernel.staging import import_generation, register_generation

if TYPE_CHECKING:
    from kernel.kernel import Kernel

STATE_SECTION = "plugins"
CONFIG_SECTION = "plugin_config"
#: How long a retirement waits for the calls it cancelled to unwind.
_CANCEL_GRACE = 1.0


@attrs.define(eq=False, slots=False)  # slots=False: cached_property
class Generation:
    """One imported version of a plugin, with what it contributed and what it holds."""

    number: int
    pm_name: str
    imported: ImportedGeneration
    contributions: Contributions
    config_schema: Mapping[str, Any] | None
    hooks: tuple[str, ...]
    gate: Gate = attrs.field(factory=Gate)
    scope: Scope | None = None
    ctx: PluginContext | None = None
    #: The plugin directory's files as they were when it was imported (user plugins).
    files: PluginFiles | None = None

    @functools.cached_property
    def route_labels(self) -> tuple[str, ...]:
        """`METHOD /path` of every route it contributes (`WS /path` for WebSockets)."""
        return ROUTES.labels(self.contributions.of(ROUTES))


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
    #: The last failed reload, kept until a load succeeds (`error` stays None meanwhile).
    last_reload_error: ReloadFailure | None = None
    generations: int = 0
    lock: anyio.Lock = attrs.field(factory=anyio.Lock)
    idle: anyio.Event = attrs.field(factory=anyio.Event)

    @property
    def name(self) -> str:
        """The plugin's name."""
        return self.candidate.name


class GenerationOps:
    """The generation machinery of a PluginManager (see the module docstring)."""

    kernel: Kernel
    pm: pluggy.PluginManager
    records: dict[str, PluginRecord]
    hook_index: dict[str, list[tuple[str, pluggy.HookImpl, Generation]]]
    module_owners: dict[str, str]
    _stopping: bool

    # -- the transaction ------------------------------------------------------------------

    def _operation(self, rec: PluginRecord) -> Operation:
        return Operation(rec)

    async def _refresh_candidate(self, rec: PluginRecord) -> None:
        """Re-read a plugin's manifest from disk before a reload (it may have changed)."""
        cand = rec.candidate
        if cand.source is not PluginSource.USER or cand.path is None:
            return
        new = await anyio.to_thread.run_sync(read_directory_plugin, cand.path)
        if new is None:
            rec.candidate = attrs.evolve(cand, problem=f"plugin directory {cand.path} is gone")
            return
        # As in `discover`: importing it would replace that module everywhere.
        if (
            new.problem is None
            and rec.generation is None
            and await anyio.to_thread.run_sync(shadows_module, new.name)
        ):
            new = attrs.evolve(
                new,
                problem=f"plugin name {new.name!r} would shadow an importable "
                "module; rename the plugin",
            )
        rec.candidate = new

    async def _load(
        self,
        rec: PluginRecord,
        replacing: Generation | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Import, validate, swap in and start a generation; a failure changes nothing.

        `config` is the configuration to start with (default: the stored one).
        """
        name = rec.name
        if replacing is None:
            rec.state = PluginState.LOADING
        try:
            gen = await self._stage(rec)
        except MissingServiceError as exc:
            # Waiting, not failed: the manager starts it once the service is served.
            if replacing is None:
                rec.state, rec.error = PluginState.PENDING, exc.message
            raise
        except NekoError as exc:
            if replacing is None:
                rec.state, rec.error = PluginState.FAILED, exc.message
                await self._emit_failed(rec, exc.message)
            # The plugin's own traceback (an import that raised), for its author.
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else None
            rec.log.error("loading plugin %r failed: %s", name, exc.message, exc_info=cause)
            raise
        if replacing is not None:
            await self._retire(rec, replacing)
            try:
                # While the old generation stopped, another plugin may have claimed a key
                # the new one adds; the old one's keys are still its own.
                self._check_registries(name, gen.contributions, replacing=True)
            except NekoError as exc:
                self.pm.unregister(name=gen.pm_name)
                gen.imported.rollback()
                await self._restore(rec, replacing)
                rec.log.error("loading plugin %r failed: %s", name, exc.message)
                raise PluginLoadError(name, exc.message) from None
            self._commit_registries(rec, gen, replacing=True)
        else:
            self._commit_registries(rec, gen, replacing=False)
        try:
            await self._activate(rec, gen, config)
        except NekoError as exc:
            # Registries first, before the awaits below, so that no other plugin's load
            # sees the failed generation's entries or the previous one's keys unclaimed.
            restored = self._recommit(rec, replacing) if replacing is not None else None
            if restored is None:
                self._drop_registries(name, transfer=replacing is None)
            await self._deactivate(gen)
            self.pm.unregister(name=gen.pm_name)
            gen.imported.rollback()
            if restored is not None and replacing is not None:
                rec.log.error(
                    "new generation of %r failed to start (%s); restoring the previous one",
                    name,
                    exc.message,
                )
                await self._restart(rec, restored, replacing)
            else:
                self.kernel.loader.forget(rec.candidate)
                rec.generation = None
                rec.state, rec.error = PluginState.FAILED, exc.message
                self._reindex()
                if replacing is None:  # a failed reload is reported by `reload`
                    await self._emit_failed(rec, exc.message)
            raise
        gen.imported.commit()
        rec.generation = gen
        rec.state, rec.error = PluginState.ACTIVE, None
        rec.last_reload_error = None
        rec.loaded_at = time.time()
        self._reindex()
        await self.kernel.persist_registries()

    async def _stage(self, rec: PluginRecord) -> Generation:
        """Import a new generation and check its contributions; nothing is committed."""
        name, cand = rec.name, rec.candidate
        if cand.manifest is not None:
            try:
                check_compatible(cand.manifest)
            except NekoError as exc:
                raise PluginLoadError(name, exc.message) from None
        # Before the import: an edit made during it makes the files differ afterwards.
        files = None
        if cand.source is PluginSource.USER and cand.path is not None:
            files = await anyio.to_thread.run_sync(plugin_files, cand.path)
        imported = await anyio.to_thread.run_sync(import_generation, self.kernel.loader, cand)
        rec.generations += 1
        pm_name = f"{name}#{rec.generations}"
        try:
            module = _registrable(self.pm, imported.module)
            hooks, contributions = register_generation(self.pm, module, pm_name, name)
            schema = contributions.config_schema or (
                cand.manifest.config_schema if cand.manifest else None
            )
            gen = Generation(
                rec.generations, pm_name, imported, contributions, schema, hooks, files=files
            )
            self._check_registries(name, contributions, replacing=rec.generation is not None)
            self._check_requirements(rec, gen)
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

    def _check_requirements(self, rec: PluginRecord, gen: Generation) -> None:
        """Refuse a staged generation whose required services are not served (the
        manager's); `_stage` rolls `gen` back."""

    def _check_registries(self, name: str, c: Contributions, *, replacing: bool) -> None:
        for kind, registry in self.kernel.registries.items():
            registry.check(name, c.of(kind), replacing=replacing)

    def _commit_registries(self, rec: PluginRecord, gen: Generation, *, replacing: bool) -> None:
        k, c, name = self.kernel, gen.contributions, rec.name
        for kind, registry in k.registries.items():
            registry.commit(name, c.of(kind), gen, replacing=replacing)
        cand = rec.candidate
        # Builtins share their distribution's top-level package: attribute by full module.
        builtin = cand.source is PluginSource.BUILTIN
        self.module_owners[cand.module if builtin else cand.module.partition(".")[0]] = name
        k.asgi_app.rebuild()

    def _drop_registries(self, name: str, *, transfer: bool) -> None:
        k = self.kernel
        for registry in k.registries.values():
            registry.drop_owner(name, transfer=transfer)
        for module, owner in list(self.module_owners.items()):
            if owner == name:
                del self.module_owners[module]
        k.asgi_app.rebuild()

    async def _activate(
        self, rec: PluginRecord, gen: Generation, config: Mapping[str, Any] | None = None
    ) -> None:
        """Give the generation a scope and context, run its start hook, open its gate."""
        k = self.kernel
        if config is None:
            stored = await k.storage.state_get(CONFIG_SECTION, rec.name, {})
            try:
                config = validate_config(gen.config_schema, stored)
            except NekoError as exc:
                raise PluginLoadError(
                    rec.name, f"stored configuration is invalid: {exc.message}"
                ) from None
        scope = Scope(rec.name, k.task_group, rec.log, step_timeout=k.config.hook_timeout)
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
        timeout = k.config.handler_timeout
        if not await gen.gate.close(timeout):
            log = gen.ctx.log if gen.ctx is not None else k.log
            cancelled = gen.gate.cancel()
            log.warning(
                "%d call(s) into %r still running after %.1fs; cancelling them",
                len(cancelled),
                gen.pm_name,
                timeout,
            )
            for label in cancelled:
                log.error(
                    "cancelled %s of plugin %r: it outlived its plugin's retirement",
                    label,
                    gen.pm_name.partition("#")[0],
                )
            # Cancellation reaches a call at its next await; one that ignores it is left.
            if not await gen.gate.wait(min(timeout, _CANCEL_GRACE)):
                log.error(
                    "%d call(s) into %r ignored cancellation; disposing it anyway",
                    gen.gate.in_flight,
                    gen.pm_name,
                )
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
        """Bring a retired generation back after its successor failed (its entries are
        still in the registries: the successor's were not committed)."""
        restored = self._recommit(rec, old)
        assert restored is not None
        await self._restart(rec, restored, old)

    def _recommit(self, rec: PluginRecord, old: Generation) -> Generation | None:
        """Register a retired generation again and put its entries back (no await).

        None if another plugin claimed one of its keys while its successor was
        starting: it cannot come back.
        """
        try:
            self._check_registries(rec.name, old.contributions, replacing=True)
        except NekoError as exc:
            rec.log.error("the previous generation of %r cannot return: %s", rec.name, exc.message)
            return None
        restored = Generation(
            old.number,
            old.pm_name,
            old.imported,
            old.contributions,
            old.config_schema,
            old.hooks,
            files=old.files,
        )
        # Committed anew: the old entries point at the retired generation, whose gate
        # stays closed.
        self.pm.register(old.imported.module, name=old.pm_name)
        self._commit_registries(rec, restored, replacing=True)
        return restored

    async def _restart(self, rec: PluginRecord, restored: Generation, old: Generation) -> None:
        """Start a recommitted generation with the configuration it ran with."""
        try:
            await self._activate(rec, restored, old.ctx.config if old.ctx else None)
        except NekoError as exc:
            await self._deactivate(restored)
            self.pm.unregister(name=restored.pm_name)
            self._drop_registries(rec.name, transfer=False)
            self.kernel.loader.forget(rec.candidate)
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
            await self.kernel.persist_registries()

    def _reindex(self) -> None:
        index: dict[str, list[tuple[str, pluggy.HookImpl, Generation]]] = {}
        for name in sorted(self.records):
            gen = self.records[name].generation
            if gen is None:
                continue
            for hook in gen.hooks:
                for impl in impls_of(self.pm, hook, gen.pm_name):
                    index.setdefault(hook, []).append((name, impl, gen))
        for hook in PRIORITISED_HOOKS:
            # Stable: equal priorities stay in plugin-name order, whatever pluggy's is.
            index.get(hook, []).sort(key=lambda entry: -priority_of(entry[1].function))
        self.hook_index = index

    async def _persist_enabled(self, rec: PluginRecord) -> None:
        await self.remember_enabled(rec.name, rec.enabled)

    async def remember_enabled(self, name: str, enabled: bool) -> None:
        """Store whether `name` is enabled (also for a plugin not discovered yet)."""
        await self.kernel.storage.state_set(STATE_SECTION, name, {"enabled": enabled})

    async def _emit_failed(self, rec: PluginRecord, error: str) -> None:
        await self.kernel.emit(
            KernelEvent("plugin.failed", {"name": rec.name, "error": error}, plugin=rec.name)
        )


class Operation:
    """Serializes operations on one plugin and marks it busy while one runs.

    Once begun, an operation runs to its end even if its caller is cancelled (its steps
    are time-bounded): a reload cut short, e.g. in a call that another plugin's
    retirement cancels, would leave the plugin with its gate closed and its generation
    neither disposed nor restored. The caller's cancellation takes effect after it.
    """

    def __init__(self, rec: PluginRecord) -> None:
        self.rec = rec
        self._shield = anyio.CancelScope(shield=True)
        self._token: Token[frozenset[str]] | None = None

    async def __aenter__(self) -> None:
        await self.rec.lock.acquire()
        self.rec.idle = anyio.Event()
        self._shield.__enter__()
        self._token = begin_operation(self.rec.name)

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._token is not None:
            end_operation(self._token)
        self._shield.__exit__(*exc_info)
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
