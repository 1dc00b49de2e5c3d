"""Which plugin needs which: the `requires` and `provides` a plugin module declares.

    from kernel.protocols import AuthService
    requires = (AuthService,)      # started after, stopped before, their providers
    provides = (CounterService,)   # what `ctx.provide` may offer

Declarations are module attributes holding the key classes themselves (not names in
plugin.toml): the type checker checks them, a rename refactors them, and they are the
same objects `ctx.services.get` and `ctx.provide` take. They are known once a
generation is imported, so the kernel orders start-up by trying plugins and putting back
those whose requirements are not served yet (`PluginManager.start`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import attrs

from kernel.errors import PluginLoadError
from kernel.services import ServiceRegistry, service_name


class MissingServiceError(PluginLoadError):
    """A plugin requires a service that no active plugin provides (or it is in a cycle);
    it starts once a provider serves it."""


@attrs.frozen
class Declarations:
    """What one plugin generation requires and provides."""

    requires: tuple[type, ...] = ()
    provides: tuple[type, ...] = ()


def _keys(plugin: str, module: ModuleType, attr: str) -> tuple[type, ...]:
    value = getattr(module, attr, ())
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, Iterable) or isinstance(items, str | bytes):
        raise PluginLoadError(plugin, f"{attr!r} must be a tuple of service classes")
    keys = tuple(items)
    bad = [k for k in keys if not isinstance(k, type)]
    if bad:
        raise PluginLoadError(
            plugin, f"{attr!r} must name service classes, not {', '.join(map(repr, bad))}"
        )
    return keys


def read_declarations(plugin: str, module: ModuleType) -> Declarations:
    """The `requires` and `provides` of a plugin module (PluginLoadError if malformed)."""
    return Declarations(_keys(plugin, module, "requires"), _keys(plugin, module, "provides"))


class DependencyGraph:
    """The requirements between plugins, from their declarations and who provides what.

    `declared(name)` gives a plugin's declarations: those of its serving generation, or
    those remembered from its last import if it is waiting for a service.
    """

    def __init__(
        self, services: ServiceRegistry, active: Callable[[str], Declarations | None]
    ) -> None:
        self.services = services
        self._active = active
        #: Plugins put back because a required service is not served: their declarations.
        self.waiting: dict[str, Declarations] = {}

    def declared(self, name: str) -> Declarations | None:
        """What `name` declares, if it is known."""
        active = self._active(name)
        return active if active is not None else self.waiting.get(name)

    def declared_provider(self, key: type, names: Iterable[str]) -> str | None:
        """The plugin among `names` that provides `key`, or declares that it does."""
        owner = self.services.provider(key)
        if owner is not None:
            return owner
        for name in sorted(names):
            decl = self.declared(name)
            if decl is not None and key in decl.provides:
                return name
        return None

    def missing(self, decl: Declarations, *, reloading_counts: bool = False) -> list[type]:
        """The required keys no plugin provides now. With `reloading_counts`, a key whose
        provider is in the middle of an operation (a reload) counts as provided."""
        services = self.services

        def served(key: type) -> bool:
            if services.provider(key) is not None:
                return True
            last = services.last_provider(key)
            return reloading_counts and last is not None and services.plugins.busy(last)

        return [k for k in decl.requires if not served(k)]

    def check(
        self, name: str, decl: Declarations, names: Iterable[str], *, replacing: bool = False
    ) -> None:
        """MissingServiceError unless every service `decl` requires is provided and no
        requirement leads back to `name` (`names`: every known plugin).

        `replacing`: `name` is active and being reloaded. Then a provider that is busy
        too (both edited at once) counts as serving: the calls of the new generation
        wait for it. A plugin that is not active yet must find its services served, so
        that one starting while its provider is being disabled cannot outlive it.
        """
        names = list(names)
        cycle = self.cycle(name, decl, names)
        if cycle:
            raise MissingServiceError(name, f"service dependency cycle: {cycle}")
        missing = self.missing(decl, reloading_counts=replacing)
        if missing:
            parts = []
            for key in missing:
                provider = self.declared_provider(key, [n for n in names if n != name])
                parts.append(
                    f"service {service_name(key)}, which plugin {provider!r} declares but "
                    "does not serve"
                    if provider
                    else f"service {service_name(key)}, which no plugin provides"
                )
            raise MissingServiceError(
                name, f"plugin {name!r} requires {'; and '.join(parts)} (it starts once served)"
            )

    def cycle(self, name: str, decl: Declarations, names: list[str]) -> str:
        """A description of a requirement chain from `name` back to itself, or ""."""

        def walk(current: str, d: Declarations, path: list[str], seen: set[str]) -> str:
            for key in d.requires:
                provider = self.declared_provider(key, names)
                if provider is None or provider == current:
                    continue
                step = f"{current!r} requires {service_name(key)} (provided by {provider!r})"
                if provider == name:
                    return ", ".join([*path, step])
                if provider in seen:
                    continue
                seen.add(provider)
                nxt = self.declared(provider)
                if nxt is not None:
                    found = walk(provider, nxt, [*path, step], seen)
                    if found:
                        return found
            return ""

        return walk(name, decl, [], {name})

    def dependents(self, provider: str, active: Iterable[str]) -> list[str]:
        """The plugins among `active` that require a service `provider` provides now."""
        keys = set(self.services.provided_by(provider))
        found = []
        for name in active:
            decl = self.declared(name)
            if name != provider and decl is not None and keys.intersection(decl.requires):
                found.append(name)
        return found

    def stop_order(self, active: list[str]) -> list[str]:
        """`active` reordered so that every consumer comes before its providers; ties (and
        an impossible order) keep the given order."""
        remaining = list(active)
        order = []
        while remaining:
            for name in remaining:
                if not self.dependents(name, remaining):
                    break
            else:
                name = remaining[0]  # a cycle among active plugins: keep the given order
            remaining.remove(name)
            order.append(name)
        return order
