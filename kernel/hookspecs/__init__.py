"""Every hookspec of NekoBot, grouped by domain. Only the kernel declares hookspecs.

Contribution hooks are synchronous and pure; the kernel calls each hookimpl itself so
that everything it returns is attributed to its plugin. Lifecycle and event hooks are
async; the kernel awaits each hookimpl under a time bound and isolates its errors.
"""

from types import ModuleType

from kernel.hookspecs import commands, config, events, http, lifecycle, llm, mcp, platforms
from kernel.hookspecs.markers import PROJECT, Priority, hookimpl, hookspec, priority

SPEC_MODULES: tuple[ModuleType, ...] = (
    lifecycle,
    config,
    commands,
    http,
    platforms,
    llm,
    mcp,
    events,
)

#: Hooks whose results are collected per plugin when it loads (sync, pure).
CONTRIBUTION_HOOKS: tuple[str, ...] = (
    "nekobot_commands",
    "nekobot_routes",
    "nekobot_http_middleware",
    "nekobot_ws_channels",
    "nekobot_platform_types",
    "nekobot_llm_provider_types",
    "nekobot_mcp_servers",
    "nekobot_config_schema",
)

#: Hooks whose implementations are called in `@priority` order (the others ignore it).
PRIORITISED_HOOKS: tuple[str, ...] = ("nekobot_on_message",)


def all_hook_names() -> tuple[str, ...]:
    """The names of every hookspec, in declaration order."""
    names: list[str] = []
    for module in SPEC_MODULES:
        names.extend(n for n, v in vars(module).items() if n.startswith("nekobot_") and callable(v))
    return tuple(names)


__all__ = [
    "CONTRIBUTION_HOOKS",
    "PRIORITISED_HOOKS",
    "PROJECT",
    "SPEC_MODULES",
    "Priority",
    "all_hook_names",
    "hookimpl",
    "hookspec",
    "priority",
]
