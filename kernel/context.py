"""PluginContext: a plugin's only door to the kernel, bound to one generation's Scope."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kernel.dependencies import read_declarations
from kernel.errors import DisposedError
from kernel.lifecycle import DisposeCallback, Scope, TaskHandle
from kernel.models import KernelEvent, Reply, Target
from kernel.private_files import make_private_dir
from kernel.protocols import WsHub
from kernel.services import ServiceKey, ServiceRegistry, check_key, service_name
from kernel.storage import PluginStore

if TYPE_CHECKING:
    import httpx

    from kernel.adapter import Adapter, SendResult
    from kernel.generations import Generation
    from kernel.kernel import Kernel

T = TypeVar("T")


class PluginContext:
    """What one plugin generation may do; everything it acquires is disposed with it."""

    def __init__(
        self,
        kernel: Kernel,
        name: str,
        scope: Scope,
        config: Mapping[str, Any],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self._kernel = kernel
        self.name = name
        self.scope = scope
        self.config: Mapping[str, Any] = config
        self.log = log
        self._http: httpx.AsyncClient | None = None

    # -- resources -------------------------------------------------------------------

    def start_task(
        self, func: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None
    ) -> TaskHandle:
        """Run `func(*args)` in the background; it is cancelled when the plugin goes away."""
        return self.scope.start_task(func, *args, name=name)

    def on_dispose(
        self, callback: DisposeCallback, *, name: str | None = None
    ) -> Callable[[], None]:
        """Run `callback` when the plugin goes away (reverse order of registration).

        Returns a function that withdraws the callback.
        """
        return self.scope.on_dispose(callback, name=name)

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager now; it is exited when the plugin goes away."""
        return await self.scope.enter_async_context(cm)

    @property
    def http(self) -> httpx.AsyncClient:
        """An httpx client owned by this plugin generation, closed with it."""
        if self.scope.closed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot use http")
        if self._http is None:
            import httpx  # ~40-70 ms of start-up; most plugins never use it

            client = httpx.AsyncClient(timeout=30.0)
            self.scope.on_dispose(client.aclose, name="http client")
            self._http = client
        return self._http

    def _check_live(self, what: str) -> None:
        # Usable during disposal (dispose callbacks need them), not after: a reference
        # kept by leaked code must not go on acting for a plugin that is gone.
        if self.scope.disposed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot use {what}")

    @property
    def store(self) -> PluginStore:
        """The plugin's key/value store and namespaced tables (kept across reloads)."""
        self._check_live("store")
        return self._kernel.storage.plugin_store(self.name, lambda: self._check_live("store"))

    @property
    def data_dir(self) -> Path:
        """A directory for the plugin's files, inside the kernel's data directory."""
        self._check_live("data_dir")
        path = self._kernel.config.data_dir / "plugin_data"
        make_private_dir(path)
        return make_private_dir(path / self.name)

    def provide(self, key: ServiceKey[Any], value: object) -> None:
        """Offer `value` to other plugins as the service `key` (a class, usually a Protocol,
        that the module's `provides` lists); withdrawn when this generation is disposed.

        Calls through consumers' handles reach it once this generation has started.
        """
        if self.scope.closed:  # checked first: nothing would withdraw it
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot provide")
        cls = check_key(key)
        gen = self._generation()
        if (
            gen is not None
            and cls not in read_declarations(self.name, gen.imported.module).provides
        ):
            raise ValueError(
                f"plugin {self.name!r} provides service {service_name(cls)} without declaring "
                f"it: add it to the module's `provides`"
            )
        services = self._kernel.services
        services.provide(self.name, cls, value, gen.gate if gen is not None else None)
        self.scope.on_dispose(
            lambda: services.withdraw(self.name, cls), name=f"withdraw service {service_name(cls)}"
        )

    def _generation(self) -> Generation | None:
        rec = self._kernel.plugins.records.get(self.name)
        gen = rec.generation if rec is not None else None
        return gen if gen is not None and gen.ctx is self else None

    @property
    def services(self) -> ServiceRegistry:
        """Services provided by plugins: `ctx.services.get(Key)` is a handle typed `Key`."""
        self._check_live("services")
        return self._kernel.services

    @property
    def kernel(self) -> Kernel:
        """The kernel itself: for the builtin administration plugins."""
        self._check_live("kernel")
        return self._kernel

    def subscribe_events(self, callback: Callable[[KernelEvent], None]) -> Callable[[], None]:
        """Call `callback` (non-blocking) with every kernel event until the plugin goes away."""
        if self.scope.closed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot subscribe")
        unsubscribe = self._kernel.subscribe_events(callback)
        self.scope.on_dispose(unsubscribe, name="event subscription")
        return unsubscribe

    # -- messages and events -----------------------------------------------------------

    async def emit(self, type: str, data: Mapping[str, Any] | None = None) -> None:
        """Publish a kernel event attributed to this plugin (the `events` channel)."""
        if self.scope.closed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot emit")
        await self._kernel.emit(KernelEvent(type, data or {}, plugin=self.name))

    def attach_adapter(self, instance: str, adapter: Adapter) -> None:
        """Route replies for platform `instance` through `adapter` (a platform plugin's
        connection) until the plugin goes away."""
        if self.scope.closed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot attach")
        detach = self._kernel.pipeline.attach(instance, adapter)
        self.scope.on_dispose(detach, name=f"adapter {instance}")

    def publish(self, channel: str, data: Any) -> int:
        """Publish `data` on a WebSocket channel this plugin contributed; returns 1 if a hub
        took it, 0 if no hub is running."""
        if self.scope.closed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot publish")
        entry = self._kernel.channels.get(channel)
        if entry is None or entry.owner != self.name:
            raise ValueError(f"plugin {self.name!r} does not own channel {channel!r}")
        hub = self._kernel.services.current(WsHub)
        if hub is None:
            return 0
        hub.publish(channel, data)
        return 1

    async def send(self, target: Target, message: Reply | str) -> SendResult:
        """Send a message through the platform instance that `target` names; returns the
        platform's ids of the messages sent."""
        if self.scope.closed:
            raise DisposedError(f"plugin {self.name!r} was disposed; cannot send")
        reply = Reply.text(message) if isinstance(message, str) else message
        return await self._kernel.pipeline.send(target, reply)
