"""Services: typed objects plugins offer each other, reached through handles that
outlive a reload of their provider.

A service is keyed by a class, usually a `typing.Protocol` that both sides import from
a module they share (the kernel's are in `kernel.protocols`), never from each other.
`ServiceRegistry.get(Key)` returns a proxy typed as `Key`: a coroutine method called
through it goes to the provider's current generation, inside that generation's gate
(so a retirement waits for it), and waits, bounded, while the provider reloads.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar, cast

import anyio
import attrs

from kernel.errors import NekoError
from kernel.lifecycle import Gate, GateCall, GateClosedError

T = TypeVar("T")

#: A service key as the type checker sees it: a class (usually a Protocol) whose
#: instances are the service. `Callable[..., T]` rather than `type[T]` because mypy
#: refuses a Protocol class where `type[T]` is expected ("Only concrete class").
ServiceKey = Callable[..., T]


class ServiceUnavailableError(NekoError):
    """A service call cannot be served: nobody provides it, its provider went away,
    or it did not come back from a reload in time. `service` and `provider` name them."""

    code = "service_unavailable"

    def __init__(self, service: str, provider: str | None, message: str) -> None:
        super().__init__(message)
        self.service = service
        self.provider = provider


class ProviderStates(Protocol):
    """What the registry needs of the plugin manager to wait for a reload."""

    def busy(self, name: str) -> bool:
        """Whether an operation (load, reload, disable, ...) is running on `name`."""

    async def settled(self, name: str) -> None:
        """Wait until no operation is running on `name`."""


class _NoPlugins:
    def busy(self, name: str) -> bool:
        return False

    async def settled(self, name: str) -> None:
        return None


def service_name(key: object) -> str:
    """How errors and logs name the service keyed by `key`: its qualified class name."""
    module = getattr(key, "__module__", "")
    qualname = getattr(key, "__qualname__", repr(key))
    return f"{module}.{qualname}" if module and module != "builtins" else str(qualname)


def check_key(key: object) -> type:
    """`key` if it can key a service (a class), else TypeError."""
    if not isinstance(key, type):
        raise TypeError(f"a service is keyed by a class (usually a Protocol), not {key!r}")
    return key


def check_value(key: type, value: object) -> None:
    """Refuse `value` for `key` when that is cheap to tell: an instance check against a
    plain class or a runtime-checkable protocol (which checks member names only)."""
    is_protocol = bool(getattr(key, "_is_protocol", False))
    if is_protocol and not getattr(key, "_is_runtime_protocol", False):
        return  # isinstance would raise; only the type checker can tell
    if not isinstance(value, key):
        raise TypeError(
            f"{type(value).__name__} does not implement service {service_name(key)}"
            + (" (a member is missing)" if is_protocol else "")
        )


@attrs.frozen
class _Entry:
    owner: str
    value: object
    #: The providing generation's gate; None for a value the kernel or a test provides.
    gate: Gate | None


class ServiceRegistry:
    """The services of one Kernel, by key class; what a plugin provides is withdrawn
    when its generation is disposed."""

    def __init__(self, plugins: ProviderStates | None = None, *, timeout: float = 10.0) -> None:
        self._items: dict[type, _Entry] = {}
        #: service name -> the plugin that provided it last (kept after a withdrawal, so
        #: that a call can tell "reloading" from "gone" and name the provider). By name:
        #: a key class defined in a plugin must not keep its module alive.
        self._last_owner: dict[str, str] = {}
        self.plugins: ProviderStates = plugins if plugins is not None else _NoPlugins()
        #: Default bound of a call's wait for a reloading provider, in seconds.
        self.timeout = timeout

    # -- providing ---------------------------------------------------------------------

    def provide(
        self, owner: str, key: ServiceKey[Any], value: object, gate: Gate | None = None
    ) -> None:
        """Offer `value` as the service `key`; a key another plugin provides is refused.

        `gate`: the providing generation's gate; calls enter it, and wait while it is closed.
        """
        cls = check_key(key)
        check_value(cls, value)
        current = self._items.get(cls)
        if current is not None and current.owner != owner:
            raise ValueError(
                f"service {service_name(cls)} is already provided by plugin {current.owner!r}"
            )
        self._items[cls] = _Entry(owner, value, gate)
        self._last_owner[service_name(cls)] = owner

    def withdraw(self, owner: str, key: ServiceKey[Any]) -> None:
        """Remove the service `key` if `owner` provides it."""
        cls = check_key(key)
        entry = self._items.get(cls)
        if entry is not None and entry.owner == owner:
            del self._items[cls]

    # -- reading -----------------------------------------------------------------------

    def get(self, key: ServiceKey[T], *, timeout: float | None = None) -> T:
        """A proxy for the service `key`, typed as `key`, valid across provider reloads.

        Coroutine methods (as `key` declares them) wait while the provider reloads;
        anything else is read from the provider's current generation at once, and
        raises ServiceUnavailableError when there is none (see `ServiceHandle`).
        """
        return self.handle(key, timeout=timeout).proxy

    def handle(self, key: ServiceKey[T], *, timeout: float | None = None) -> ServiceHandle[T]:
        """The handle of the service `key`: availability, the current value, `use()`."""
        return ServiceHandle(self, cast(type[T], check_key(key)), timeout)

    def current(self, key: ServiceKey[T]) -> T | None:
        """The service `key` if its provider is started and serving, else None (no wait)."""
        entry = self._items.get(check_key(key))
        if entry is None or (entry.gate is not None and entry.gate.closed):
            return None
        return cast(T, entry.value)

    def provider(self, key: ServiceKey[Any]) -> str | None:
        """The plugin providing `key` now, or None."""
        entry = self._items.get(check_key(key))
        return entry.owner if entry else None

    def last_provider(self, key: ServiceKey[Any]) -> str | None:
        """The plugin that provided `key` last, even if it withdrew it since."""
        return self._last_owner.get(service_name(check_key(key)))

    def provided_by(self, owner: str) -> list[type]:
        """The keys `owner` provides now."""
        return [k for k, e in self._items.items() if e.owner == owner]

    def names(self) -> list[str]:
        """The name of every provided service, sorted."""
        return sorted(service_name(k) for k in self._items)

    # -- calling -----------------------------------------------------------------------

    async def enter(
        self, key: type, label: str | Callable[[], str], bound: float
    ) -> tuple[object, GateCall | None]:
        """The value of `key` and the gate call it runs in (None: ungated), waiting up to
        `bound` seconds while its provider reloads. Leave the call with `leave`."""
        entry = self._items.get(key)
        if entry is not None:  # the common case, without the cost of a cancel scope
            if entry.gate is None:
                return entry.value, None
            if not entry.gate.closed:
                return entry.value, entry.gate.enter(label)
        name = service_name(key)
        try:
            with anyio.fail_after(bound):
                while True:
                    entry = self._items.get(key)
                    if entry is not None:
                        if entry.gate is None:
                            return entry.value, None
                        try:
                            return entry.value, entry.gate.enter(label)
                        except GateClosedError:
                            pass
                    owner = entry.owner if entry is not None else self._last_owner.get(name)
                    if owner is None:
                        raise ServiceUnavailableError(
                            name, None, f"no plugin provides service {name}"
                        )
                    if not self.plugins.busy(owner):
                        raise ServiceUnavailableError(
                            name,
                            owner,
                            f"service {name} of plugin {owner!r} is gone (the plugin is "
                            "not active, or no longer provides it)",
                        )
                    await self.plugins.settled(owner)
        except TimeoutError:
            owner = self._last_owner.get(name)
            raise ServiceUnavailableError(
                name,
                owner,
                f"service {name} of plugin {owner!r} did not come back within {bound:g}s",
            ) from None

    @staticmethod
    def leave(call: GateCall | None) -> None:
        """Leave a call `enter` returned."""
        if call is not None:
            call.gate.leave(call)


class ServiceHandle(Generic[T]):
    """A consumer's reference to a service: valid across reloads of its provider.

    `proxy` forwards attribute access to the provider's current generation. A coroutine
    method (declared `async def` on the key) runs inside that generation's gate and, while
    the provider reloads, waits (up to the handle's timeout) for the new generation to
    finish starting; a provider gone for good fails it with ServiceUnavailableError at
    once. Sync methods and plain attributes never wait (they cannot without blocking the
    event loop): they are read from the current generation, or raise at once; use
    `async with handle.use() as service:` to wait and then use them.
    """

    def __init__(self, registry: ServiceRegistry, key: type[T], timeout: float | None) -> None:
        self.registry = registry
        self.key = key
        self.name = service_name(key)
        self._timeout = timeout
        self._methods: dict[str, Callable[..., Any] | None] = {}

    @property
    def timeout(self) -> float:
        """How long a call waits for a reloading provider, in seconds."""
        return self.registry.timeout if self._timeout is None else self._timeout

    @property
    def available(self) -> bool:
        """Whether a started provider serves the service now (no wait)."""
        return self.registry.current(self.key) is not None

    @property
    def provider(self) -> str | None:
        """The plugin providing the service now, or None."""
        return self.registry.provider(self.key)

    def current(self) -> T | None:
        """The provider's value now, or None while it reloads or when nobody provides it.

        Use it at once: a value kept across an await may belong to a retired generation.
        """
        return self.registry.current(self.key)

    def require(self) -> T:
        """`current()`, or ServiceUnavailableError naming the service and its provider."""
        value = self.current()
        if value is None:
            owner = self.registry.last_provider(self.key)
            what = f"of plugin {owner!r} is not serving" if owner else "is not provided"
            raise ServiceUnavailableError(self.name, owner, f"service {self.name} {what}")
        return value

    @asynccontextmanager
    async def use(self) -> AsyncIterator[T]:
        """Wait (bounded) for a started provider and hold its generation for the block:
        a reload of the provider waits until the block has ended."""
        value, call = await self.registry.enter(self.key, f"service {self.name}", self.timeout)
        try:
            if call is None:
                yield cast(T, value)
            else:
                with call.cancel_scope:
                    yield cast(T, value)
                _raise_if_cancelled(call, self.name)
        finally:
            self.registry.leave(call)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Await `method(*args, **kwargs)` of the current provider (what `proxy` does for
        coroutine methods)."""
        # The label is made only if a retirement logs the call: calls are many.
        value, gate_call = await self.registry.enter(
            self.key, lambda: f"service call {self.name}.{method}", self.timeout
        )
        try:
            if gate_call is None:
                return await getattr(value, method)(*args, **kwargs)
            with gate_call.cancel_scope:
                result = await getattr(value, method)(*args, **kwargs)
            _raise_if_cancelled(gate_call, self.name)
            return result
        finally:
            self.registry.leave(gate_call)

    def coroutine_method(self, attr: str) -> Callable[..., Any] | None:
        """What `proxy.<attr>` is when the key declares `attr` a coroutine method (else
        None): a function awaiting it through `call`.

        Decided by the key's declaration, not the value: while the provider reloads there
        is no value to look at, and a coroutine method must still wait.
        """
        try:
            return self._methods[attr]
        except KeyError:
            pass
        declared = inspect.iscoroutinefunction(getattr(self.key, attr, None))
        method = functools.partial(self.call, attr) if declared else None
        self._methods[attr] = method
        return method

    @functools.cached_property
    def proxy(self) -> T:
        """An object typed as the key that forwards to the current provider."""
        return cast(T, _Proxy(self))


def _raise_if_cancelled(call: GateCall, name: str) -> None:
    if call.cancel_scope.cancelled_caught and call.cancelled:
        raise ServiceUnavailableError(
            name, None, f"a call to service {name} outlived its provider's retirement"
        )


class _Proxy:
    """Forwards attribute access to a handle's current provider (see ServiceHandle)."""

    __slots__ = ("_handle",)

    def __init__(self, handle: ServiceHandle[Any]) -> None:
        self._handle = handle

    def __getattr__(self, attr: str) -> Any:
        handle: ServiceHandle[Any] = object.__getattribute__(self, "_handle")
        method = handle.coroutine_method(attr)
        if method is not None:
            return method
        return getattr(handle.require(), attr)

    def __repr__(self) -> str:
        handle: ServiceHandle[Any] = object.__getattribute__(self, "_handle")
        return f"<service {handle.name}>"
