"""Contribution kinds, declared once: commands, routes, channels, platform types, ...

Each kind of thing a plugin contributes through a contribution hook is one
`ContributionKind` in `KINDS`: its hook, the type of its specs, how a spec is keyed
and how a key reads in messages, whether a clash is a load error (exclusive) or
leaves the holder in place (contested), and how the kernel makes its registry. The
hook list, collecting, the kernel's registries, the check/commit/drop steps of a load
and the install dry run all come from this table, so a new kind is one declaration
here (and its hookspec in `kernel.hookspecs`, which only the kernel declares).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs

from kernel.commands import CommandRegistry
from kernel.models import (
    ChannelSpec,
    CommandSpec,
    MCPServerSpec,
    MiddlewareSpec,
    PlatformType,
    ProviderType,
    RouteSpec,
)
from kernel.registry import OwnedRegistry
from kernel.tools import ToolRegistry, ToolSpec

if TYPE_CHECKING:
    from kernel.kernel import Kernel


class ContributionRegistry(Protocol):
    """What the kernel needs of the registry of one contribution kind."""

    def __len__(self) -> int:
        """How many entries it holds."""

    def check(self, owner: str, specs: Sequence[Any], *, replacing: bool) -> None:
        """Raise ContributionError if `specs` are bad or repeat a key, and (exclusive
        kinds) ConflictError if another owner holds one of their keys; write nothing.
        With `replacing`, the owner's current entries are ignored (a reload)."""

    def clashes(self, owner: str, specs: Sequence[Any]) -> list[tuple[str, str]]:
        """The keys of `specs` another owner holds now, as `(key label, holder)`."""

    def commit(
        self, owner: str, specs: Sequence[Any], generation: object, *, replacing: bool
    ) -> None:
        """Register one generation's `specs` (checked before), replacing the owner's."""

    def drop_owner(self, owner: str, *, transfer: bool = True) -> int:
        """Withdraw every entry of `owner`; with `transfer=False` (shutdown) persisted
        holder records are kept, so the owner holds its names again when it returns."""

    def export_state(self) -> Mapping[str, Any] | None:
        """What must survive a restart (None: nothing)."""

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `export_state` returned, before any plugin registers."""


S = TypeVar("S")
R = TypeVar("R", bound=ContributionRegistry)


@attrs.frozen(eq=False)  # compared and hashed by identity: kinds key dictionaries
class ContributionKind(Generic[S, R]):
    """One kind of contribution: a hook, its spec type, and how the kernel registers it."""

    #: The name of the kind and of its persisted state: "routes", "tools", ...
    name: str
    #: The contribution hook that returns the specs: "nekobot_routes", ...
    hook: str
    spec_type: type[S]
    #: How the kind reads in messages: "route", "WebSocket channel", ...
    label: str
    #: The key of a registered item (a spec, or what `expand` makes of one).
    key: Callable[[Any], Hashable]
    #: How a key reads in messages and listings.
    key_label: Callable[[Any], str]
    #: True: a key another plugin holds is recorded, and the holder keeps it (commands,
    #: tools). False (exclusive): such a key is a load error (routes, channels, ...).
    contested: bool
    #: Makes the kind's registry for a kernel.
    make_registry: Callable[[Kernel, ContributionKind[S, R]], R] = attrs.field(repr=False)
    #: The items one spec registers (a route serving GET and POST is two); None: itself.
    expand: Callable[[S], Iterable[Any]] | None = attrs.field(default=None, repr=False)

    def labels(self, specs: Iterable[S]) -> tuple[str, ...]:
        """The sorted, distinct key labels of what `specs` register."""
        items: Iterable[Any] = specs
        if self.expand is not None:
            items = [item for spec in specs for item in self.expand(spec)]
        return tuple(sorted({self.key_label(self.key(item)) for item in items}))


def exclusive(
    name: str,
    hook: str,
    spec_type: type[S],
    label: str,
    *,
    key: Callable[[Any], Hashable] = lambda spec: spec.name,
    key_label: Callable[[Any], str] = str,
    expand: Callable[[S], Iterable[Any]] | None = None,
) -> ContributionKind[S, OwnedRegistry[Any, Any]]:
    """A kind whose keys have one owner each: another plugin's claim is a load error."""

    def make(kernel: Kernel, kind: ContributionKind[S, OwnedRegistry[Any, Any]]) -> Any:
        return OwnedRegistry(kind.label, kind.key, kind.key_label, kind.expand)

    return ContributionKind(name, hook, spec_type, label, key, key_label, False, make, expand)


def _tool_registry(kernel: Kernel) -> ToolRegistry:
    async def settled(plugin: str) -> None:
        # Looked up at call time: the registries exist before the plugin manager.
        await kernel.plugins.settled(plugin)

    return ToolRegistry(kernel.log, timeout=kernel.config.handler_timeout, settled=settled)


def _route_items(route: RouteSpec) -> list[tuple[tuple[str, str], RouteSpec]]:
    methods: Iterable[str] = ("WS",) if route.websocket else route.methods
    return [((route.path, method.upper()), route) for method in methods]


def _route_label(key: tuple[str, str]) -> str:
    return f"{key[1]} {key[0]}"


COMMANDS: ContributionKind[CommandSpec, CommandRegistry] = ContributionKind(
    "commands",
    "nekobot_commands",
    CommandSpec,
    "command",
    key=lambda spec: spec.name.casefold(),
    key_label=str,
    contested=True,
    make_registry=lambda kernel, kind: CommandRegistry(kernel.log),
)
ROUTES = exclusive(
    "routes",
    "nekobot_routes",
    RouteSpec,
    "route",
    key=lambda item: item[0],
    key_label=_route_label,
    expand=_route_items,
)
MIDDLEWARE = exclusive("middleware", "nekobot_http_middleware", MiddlewareSpec, "middleware")
CHANNELS = exclusive("channels", "nekobot_ws_channels", ChannelSpec, "WebSocket channel")
PLATFORM_TYPES = exclusive(
    "platform_types", "nekobot_platform_types", PlatformType, "platform type"
)
PROVIDER_TYPES = exclusive(
    "provider_types", "nekobot_llm_provider_types", ProviderType, "LLM provider type"
)
MCP_SERVERS = exclusive("mcp_servers", "nekobot_mcp_servers", MCPServerSpec, "MCP server")
TOOLS: ContributionKind[ToolSpec, ToolRegistry] = ContributionKind(
    "tools",
    "nekobot_llm_tools",
    ToolSpec,
    "tool",
    key=lambda spec: spec.name,
    key_label=str,
    contested=True,
    make_registry=lambda kernel, kind: _tool_registry(kernel),
)


#: Every contribution kind, in the order a load checks and commits them.
KINDS: tuple[ContributionKind[Any, Any], ...] = (
    COMMANDS,
    ROUTES,
    MIDDLEWARE,
    CHANNELS,
    PLATFORM_TYPES,
    PROVIDER_TYPES,
    MCP_SERVERS,
    TOOLS,
)

#: The contribution hook that is no kind: one JSON Schema (or None) per plugin.
CONFIG_SCHEMA_HOOK = "nekobot_config_schema"


@attrs.frozen
class Contributions:
    """Everything one plugin generation contributes through its contribution hooks."""

    specs: Mapping[ContributionKind[Any, Any], tuple[Any, ...]] = attrs.field(factory=dict)
    config_schema: Mapping[str, Any] | None = None

    def of(self, kind: ContributionKind[S, Any]) -> tuple[S, ...]:
        """The specs of one kind."""
        return self.specs.get(kind, ())
