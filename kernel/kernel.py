"""The Kernel: one object that owns a bot's plugins, registries, storage and app.

There is no module-level state: two kernels can live in one process, and an
application can embed one::

    async with Kernel(KernelConfig(data_dir=..., plugin_dirs=[...])) as kernel:
        app = kernel.asgi_app

A kernel must be entered and exited in the same task (its task group demands it).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import anyio
from anyio.abc import TaskGroup

from kernel.adapter import Adapter
from kernel.asgi import KernelApp
from kernel.calling import Call, call_each, call_impl
from kernel.commands import CommandRegistry
from kernel.config import KernelConfig
from kernel.contributions import (
    CHANNELS,
    COMMANDS,
    KINDS,
    MCP_SERVERS,
    MIDDLEWARE,
    PLATFORM_TYPES,
    PROVIDER_TYPES,
    ROUTES,
    TOOLS,
    ContributionKind,
    ContributionRegistry,
)
from kernel.datadir import DataDirLock
from kernel.errors import ConfigError
from kernel.events import Pipeline
from kernel.lifecycle import detach_from_calls
from kernel.loader import ModuleLoader
from kernel.logs import KernelLogging, RepeatFilter
from kernel.manager import PluginManager
from kernel.models import (
    ChannelSpec,
    KernelEvent,
    MCPServerSpec,
    MessageEvent,
    MiddlewareSpec,
    PlatformType,
    ProviderType,
    make_converter,
)
from kernel.private_files import make_data_dir
from kernel.registry import OwnedRegistry
from kernel.reload import HotReloader
from kernel.services import ServiceRegistry
from kernel.settings import (
    BOT_CONFIG_SCHEMA,
    SETTINGS_SCHEMA,
    BotConfig,
    Settings,
    merged,
    to_json,
)
from kernel.storage import Storage
from kernel.tools import ToolRegistry
from kernel.watchdog import LoopWatchdog

EventSubscriber = Callable[[KernelEvent], None]
R = TypeVar("R", bound=ContributionRegistry)


class Kernel:
    """A NekoBot microkernel instance."""

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()
        self.id = secrets.token_hex(4)
        self.log: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(
            logging.getLogger("nekobot.kernel"), {"plugin": None, "nekobot_kernel": self.id}
        )
        self.converter = make_converter()
        self.data_lock = DataDirLock(self.config.data_dir)
        self.storage = Storage(self.config.data_dir / "nekobot.db")
        self.loader = ModuleLoader()
        self.services = ServiceRegistry(timeout=self.config.service_timeout)
        #: The registry of each contribution kind (see `kernel.contributions`).
        self.registries: dict[ContributionKind[Any, Any], ContributionRegistry] = {
            kind: kind.make_registry(self, kind) for kind in KINDS
        }
        #: The registry states last stored, by kind name (a load stores only a change).
        self._stored_states: dict[str, Any] = {}
        self.bot_config = BotConfig(command_prefixes=self.config.command_prefixes)
        self.settings = Settings(hot_reload=self.config.hot_reload)
        self.logging = KernelLogging(
            self.id,
            self.config.data_dir / "logs",
            self.config.log_buffer,
            RepeatFilter(self.config.log_repeat_limit, self.config.log_repeat_interval),
        )
        self.plugins = PluginManager(self)
        self.services.plugins = self.plugins
        self.pipeline = Pipeline(self)
        self.asgi_app = KernelApp(self)
        self.watchdog = LoopWatchdog(
            self.config.block_threshold, self._module_owner, self._report_block
        )
        self._event_subscribers: list[EventSubscriber] = []
        self._tg: TaskGroup | None = None
        self._reloader: HotReloader | None = None
        #: Serializes settings updates: each merges into the value the previous one stored.
        self._settings_lock = anyio.Lock()
        self.running = False

    # -- registries --------------------------------------------------------------------

    def registry(self, kind: ContributionKind[Any, R]) -> R:
        """The registry of one contribution kind, e.g. `kernel.registry(ROUTES)`."""
        return cast(R, self.registries[kind])

    @property
    def commands(self) -> CommandRegistry:
        """Every command of every active plugin."""
        return self.registry(COMMANDS)

    @property
    def routes(self) -> OwnedRegistry[tuple[str, str], Any]:
        """HTTP and WebSocket routes, keyed `(path, METHOD)`; an item is `(key, spec)`."""
        return self.registry(ROUTES)

    @property
    def middleware(self) -> OwnedRegistry[str, MiddlewareSpec]:
        """ASGI middleware, by name."""
        return self.registry(MIDDLEWARE)

    @property
    def channels(self) -> OwnedRegistry[str, ChannelSpec]:
        """WebSocket channels of the `/ws` hub, by name."""
        return self.registry(CHANNELS)

    @property
    def platform_types(self) -> OwnedRegistry[str, PlatformType]:
        """Chat platform types, by name."""
        return self.registry(PLATFORM_TYPES)

    @property
    def provider_types(self) -> OwnedRegistry[str, ProviderType]:
        """LLM provider types, by name."""
        return self.registry(PROVIDER_TYPES)

    @property
    def tools(self) -> ToolRegistry:
        """Every tool plugins offer the model."""
        return self.registry(TOOLS)

    @property
    def mcp_servers(self) -> OwnedRegistry[str, MCPServerSpec]:
        """MCP servers plugins ship, by name."""
        return self.registry(MCP_SERVERS)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def task_group(self) -> TaskGroup:
        """The kernel's task group (plugin tasks run in it)."""
        if self._tg is None:
            raise RuntimeError("the kernel is not running; use `async with Kernel(...)`")
        return self._tg

    async def __aenter__(self) -> Self:
        open_data_dir = await anyio.to_thread.run_sync(make_data_dir, self.config.data_dir)
        # Before anything reads or writes the directory: a second kernel on it stops here.
        await anyio.to_thread.run_sync(self.data_lock.acquire)
        try:
            await anyio.to_thread.run_sync(self.logging.start)  # opens and reads the log file
        except BaseException:
            self.data_lock.release()
            raise
        if open_data_dir is not None:
            self.log.warning("%s", open_data_dir)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await self.storage.open()
            await self._load_state()
            self.loader.install()
            if self.config.watchdog:
                tg.start_soon(self.watchdog.run, name="nekobot-watchdog")
            await self.plugins.start()
            if self.settings.hot_reload:
                await self.start_hot_reload()
        except BaseException as exc:
            await self._teardown(type(exc), exc, exc.__traceback__)
            raise
        self.running = True
        self.log.info("kernel %s started", self.id)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.running = False
        await self._teardown(exc_type, exc, tb)
        return None

    async def _teardown(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.stop_hot_reload()
            await self.plugins.shutdown()
            self.watchdog.stop()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                # Raises (a group) when the body of `async with` raised: clean up anyway.
                await tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    self.loader.uninstall()
                    await self.storage.close()
                    self.log.info("kernel %s stopped", self.id)
                    self.logging.stop()
                finally:
                    # Last: the next kernel on the directory finds the database closed.
                    await anyio.to_thread.run_sync(self.data_lock.release)

    async def _load_state(self) -> None:
        stored = await self.storage.state_items("kernel")
        for kind, registry in self.registries.items():
            registry.load_state(stored.get(kind.name, {}))
            if kind.name in stored:
                self._stored_states[kind.name] = stored[kind.name]
        try:
            self.bot_config = merged(
                self.bot_config, stored.get("bot_config", {}), BOT_CONFIG_SCHEMA
            )
            self.settings = merged(self.settings, stored.get("settings", {}), SETTINGS_SCHEMA)
        except ConfigError as exc:
            self.log.error("stored settings are invalid (%s); using defaults", exc.message)
        self._apply_log_level()

    async def persist_registries(self) -> None:
        """Store what registries keep across restarts (who holds a contested command or
        tool name, admin resolutions and aliases); an unchanged state is not written."""
        for kind, registry in self.registries.items():
            state = registry.export_state()
            if state is not None and state != self._stored_states.get(kind.name):
                await self.storage.state_set("kernel", kind.name, state)
                self._stored_states[kind.name] = state

    #: The name the command admin API knows (it persists every registry's state).
    persist_commands = persist_registries

    async def update_bot_config(
        self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> BotConfig:
        """Merge, validate (ConfigError names the field), store and apply bot config."""
        async with self._settings_lock:
            new = merged(self.bot_config, {**(changes or {}), **kwargs}, BOT_CONFIG_SCHEMA)
            await self.storage.state_set("kernel", "bot_config", to_json(new))
            self.bot_config = new
        await self.emit(KernelEvent("bot_config.changed", {}))
        return new

    async def update_settings(
        self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> Settings:
        """Merge, validate, store and apply server settings (hot reload starts/stops now)."""
        async with self._settings_lock:
            new = merged(self.settings, {**(changes or {}), **kwargs}, SETTINGS_SCHEMA)
            await self.storage.state_set("kernel", "settings", to_json(new))
            self.settings = new
        self._apply_log_level()
        if self.running:
            if new.hot_reload:
                await self.start_hot_reload()
            else:
                await self.stop_hot_reload()
        await self.emit(KernelEvent("settings.changed", {}))
        return new

    def _apply_log_level(self) -> None:
        logging.getLogger("nekobot").setLevel(self.settings.log_level)

    @property
    def hot_reloader(self) -> HotReloader | None:
        """The watcher of the plugin directories, while hot reload is on."""
        return self._reloader

    async def start_hot_reload(self) -> None:
        """Watch the plugin directories (if not already)."""
        if self._reloader is None:
            self._reloader = HotReloader(self)
            await self._reloader.start()

    async def stop_hot_reload(self) -> None:
        """Stop watching the plugin directories."""
        if self._reloader is not None:
            reloader, self._reloader = self._reloader, None
            await reloader.stop()

    # -- messages and events -----------------------------------------------------------

    async def dispatch(self, event: MessageEvent, adapter: Adapter | None = None) -> int:
        """Handle one incoming message (see `Pipeline.dispatch`)."""
        return await self.pipeline.dispatch(event, adapter)

    def is_admin(self, event: MessageEvent) -> bool:
        """True if the sender of `event` may run admin commands."""
        ids = self.bot_config.admin_ids
        sender = event.sender
        return sender.is_admin or sender.id in ids or f"{event.platform}:{sender.id}" in ids

    def subscribe_events(self, callback: EventSubscriber) -> Callable[[], None]:
        """Call `callback` (which must not block) with every kernel event; returns unsubscribe."""
        self._event_subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._event_subscribers:
                self._event_subscribers.remove(callback)

        return unsubscribe

    async def emit(self, event: KernelEvent) -> None:
        """Publish a kernel event: to subscribers now, to `nekobot_on_event` in the background."""
        level = logging.WARNING if event.type.endswith("failed") else logging.INFO
        self.log.log(level, "event %s %s", event.type, dict(event.data))
        for callback in list(self._event_subscribers):
            try:
                callback(event)
            except Exception:
                self.log.exception("event subscriber failed")
        impls = self.plugins.hook_index.get("nekobot_on_event")
        if impls and self._tg is not None:
            # Each call enters its generation's gate: a generation retired meanwhile is
            # skipped, and its retirement waits for a delivery in progress.
            calls: list[Call] = [
                (p, i, {"event": event, "ctx": g.ctx}, g.gate) for p, i, g in impls
            ]
            self._tg.start_soon(self._deliver_event, calls)

    async def _deliver_event(self, calls: list[Call]) -> None:
        detach_from_calls()  # the emitter's calls are not the handlers' own
        await call_each(
            calls, hook="nekobot_on_event", timeout=self.config.hook_timeout, log=self.log
        )

    async def run_chain(self, hook: str, arg: str, value: Any) -> Any:
        """Pass `value` through every implementation of a chain hook, in plugin-name order.

        Each implementation gets the previous one's result as `arg` (and its `ctx`);
        None means unchanged. Each call is time-bounded; an error is logged and skipped.
        Used for `nekobot_llm_request` and `nekobot_llm_response`.
        """
        for plugin, impl, gen in list(self.plugins.hook_index.get(hook, ())):
            # A generation going away is skipped (its successor is not offered a re-run).
            outcome = await call_impl(
                impl,
                {arg: value, "ctx": gen.ctx},
                plugin=plugin,
                hook=hook,
                timeout=self.config.hook_timeout,
                log=gen.ctx.log if gen.ctx is not None else self.log,
                gate=gen.gate,
            )
            if outcome.error is None and outcome.value is not None:
                value = outcome.value
        return value

    # -- diagnostics -------------------------------------------------------------------

    def _module_owner(self, module: str) -> str | None:
        owners = self.plugins.module_owners
        while module:
            owner = owners.get(module)
            if owner is not None:
                return owner
            module = module.rpartition(".")[0]
        return None

    def _report_block(self, plugin: str | None, message: str) -> None:
        logging.getLogger("nekobot.kernel").warning(
            message, extra={"plugin": plugin, "nekobot_kernel": self.id}
        )
