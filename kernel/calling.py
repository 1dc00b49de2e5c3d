"""Calling hooks: contributions per hookimpl, async hooks time-bounded and isolated."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Collection, Iterable, Mapping
from types import ModuleType
from typing import Any

import anyio
import attrs
import pluggy

from kernel.errors import ContributionError, PluginLoadError
from kernel.hookspecs import CONTRIBUTION_HOOKS, PRIORITISED_HOOKS, all_hook_names
from kernel.hookspecs.markers import PRIORITY_ATTR
from kernel.lifecycle import CallCancelledError, Gate, GateCall, GateClosedError
from kernel.models import (
    ChannelSpec,
    CommandSpec,
    MCPServerSpec,
    MiddlewareSpec,
    PlatformType,
    ProviderType,
    RouteSpec,
)

_ITEM_TYPES: dict[str, type] = {
    "nekobot_commands": CommandSpec,
    "nekobot_routes": RouteSpec,
    "nekobot_http_middleware": MiddlewareSpec,
    "nekobot_ws_channels": ChannelSpec,
    "nekobot_platform_types": PlatformType,
    "nekobot_llm_provider_types": ProviderType,
    "nekobot_mcp_servers": MCPServerSpec,
}


@attrs.frozen
class Contributions:
    """Everything one plugin generation contributes through its contribution hooks."""

    commands: tuple[CommandSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    middleware: tuple[MiddlewareSpec, ...] = ()
    channels: tuple[ChannelSpec, ...] = ()
    platform_types: tuple[PlatformType, ...] = ()
    provider_types: tuple[ProviderType, ...] = ()
    mcp_servers: tuple[MCPServerSpec, ...] = ()
    config_schema: Mapping[str, Any] | None = None


_FIELD_OF = {
    "nekobot_commands": "commands",
    "nekobot_routes": "routes",
    "nekobot_http_middleware": "middleware",
    "nekobot_ws_channels": "channels",
    "nekobot_platform_types": "platform_types",
    "nekobot_llm_provider_types": "provider_types",
    "nekobot_mcp_servers": "mcp_servers",
}


def impls_of(pm: pluggy.PluginManager, hook: str, pm_name: str) -> list[pluggy.HookImpl]:
    """The hookimpls of `hook` registered under `pm_name`."""
    caller = getattr(pm.hook, hook, None)
    if caller is None:
        return []
    return [i for i in caller.get_hookimpls() if i.plugin_name == pm_name]


def collect_contributions(pm: pluggy.PluginManager, pm_name: str, owner: str) -> Contributions:
    """Call each contribution hookimpl of one plugin and check what it returns."""
    values: dict[str, Any] = {}
    for hook in CONTRIBUTION_HOOKS:
        for impl in impls_of(pm, hook, pm_name):
            try:
                result = impl.function()
            except Exception as exc:
                raise ContributionError(
                    f"plugin {owner!r}: {hook} raised {type(exc).__name__}: {exc}"
                ) from exc
            if inspect.isawaitable(result):
                if hasattr(result, "close"):
                    result.close()
                raise ContributionError(f"plugin {owner!r}: {hook} must be sync, not async")
            if hook == "nekobot_config_schema":
                if result is not None and not isinstance(result, Mapping):
                    raise ContributionError(f"plugin {owner!r}: {hook} must return a mapping")
                values["config_schema"] = result
                continue
            if result is None:
                continue
            item_type = _ITEM_TYPES[hook]
            # A lone item of the wrong type is reported as such, not as a TypeError.
            if isinstance(result, item_type) or not isinstance(result, Iterable):
                items = [result]
            else:
                try:  # a generator runs the plugin's code only now
                    items = list(result)
                except Exception as exc:
                    raise ContributionError(
                        f"plugin {owner!r}: {hook} raised {type(exc).__name__}: {exc}"
                    ) from exc
            for item in items:
                if not isinstance(item, item_type):
                    raise ContributionError(
                        f"plugin {owner!r}: {hook} must yield {item_type.__name__}, "
                        f"not {type(item).__name__}"
                    )
            field = _FIELD_OF[hook]
            values[field] = (*values.get(field, ()), *items)
    return Contributions(**values)


_HOOK_NAMES = frozenset(all_hook_names())


def check_hook_names(owner: str, module: ModuleType, registered: Collection[str]) -> None:
    """Every `nekobot_*` callable of `module` must be a known hook marked `@hookimpl`
    (`registered`: the hooks pluggy found); a typo or a missing marker is a load error."""
    named = [a for a in dir(module) if a.startswith("nekobot_") and callable(getattr(module, a))]
    unknown = [a for a in named if a not in _HOOK_NAMES]
    if unknown:
        raise PluginLoadError(owner, f"unknown hook(s) {', '.join(unknown)}")
    unmarked = [a for a in named if a not in registered]
    if unmarked:
        raise PluginLoadError(owner, f"{', '.join(unmarked)} not marked with @hookimpl")
    # `@priority` elsewhere would be silently ignored: say so instead.
    ordered = [a for a in named if hasattr(getattr(module, a), PRIORITY_ATTR)]
    unordered = [a for a in ordered if a not in PRIORITISED_HOOKS]
    if unordered:
        raise PluginLoadError(
            owner,
            f"@priority on {', '.join(unordered)}: only "
            f"{', '.join(PRIORITISED_HOOKS)} is called in priority order",
        )


@attrs.frozen
class HookOutcome:
    """What one plugin's hookimpl returned or raised."""

    plugin: str
    value: Any = None
    error: BaseException | None = None


async def call_impl(
    impl: pluggy.HookImpl,
    kwargs: Mapping[str, Any],
    *,
    plugin: str,
    hook: str,
    timeout: float,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
    gate: Gate | None = None,
) -> HookOutcome:
    """Await one async hookimpl with the arguments it asks for, bounded and isolated.

    With `gate` (its generation's), the call runs inside it; if the generation is going
    away the hookimpl is not called and the outcome's error is a GateClosedError, and if
    the generation is retired while the call outlives the drain timeout, the call is
    cancelled and the outcome's error is a CallCancelledError.
    """
    if gate is None:
        return await _call(impl, kwargs, None, plugin, hook, timeout, log)
    try:
        call = gate.enter(hook)
    except GateClosedError as exc:
        return HookOutcome(plugin, None, exc)
    try:
        return await _call(impl, kwargs, call, plugin, hook, timeout, log)
    finally:
        gate.leave(call)


async def _call(
    impl: pluggy.HookImpl,
    kwargs: Mapping[str, Any],
    call: GateCall | None,
    plugin: str,
    hook: str,
    timeout: float,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> HookOutcome:
    # One cancel scope for both the time bound and the gate's cancellation.
    scope = call.cancel_scope if call is not None else anyio.CancelScope()
    scope.deadline = anyio.current_time() + timeout
    try:
        with scope:
            result = impl.function(*(kwargs[name] for name in impl.argnames))
            if inspect.isawaitable(result):
                result = await result
            return HookOutcome(plugin, result)
    except Exception as exc:
        log.error(
            "%s of plugin %r raised %s: %s", hook, plugin, type(exc).__name__, exc, exc_info=True
        )
        return HookOutcome(plugin, None, exc)
    # Only a cancellation of `scope` gets here.
    if call is not None and call.cancelled:
        return HookOutcome(
            plugin, None, CallCancelledError(f"{hook} of plugin {plugin!r} was cancelled")
        )
    log.error("%s of plugin %r timed out after %.1fs", hook, plugin, timeout)
    return HookOutcome(plugin, None, TimeoutError())


Call = tuple[str, pluggy.HookImpl, Mapping[str, Any], Gate | None]


async def call_each(
    calls: Iterable[Call],
    *,
    hook: str,
    timeout: float,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> list[HookOutcome]:
    """Await several plugins' hookimpls concurrently (each in its gate, if given);
    outcomes in the order given."""
    calls = list(calls)
    outcomes: list[HookOutcome | None] = [None] * len(calls)

    async def one(i: int, call: Call) -> None:
        plugin, impl, kwargs, gate = call
        # Log against the plugin's own logger when it has a context, so the
        # record is attributed to the plugin rather than to the kernel.
        own_log = getattr(kwargs.get("ctx"), "log", None) or log
        outcomes[i] = await call_impl(
            impl, kwargs, plugin=plugin, hook=hook, timeout=timeout, log=own_log, gate=gate
        )

    if len(calls) == 1:  # the common case on the message path: no task group
        await one(0, calls[0])
    else:
        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call)
    return [o for o in outcomes if o is not None]
