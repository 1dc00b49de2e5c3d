"""Lifecycle hooks: a plugin starts and stops with its scope."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.hookspecs.markers import hookspec

if TYPE_CHECKING:
    from kernel.context import PluginContext


@hookspec
async def nekobot_plugin_start(ctx: PluginContext) -> None:
    """Called (async) once when the plugin is enabled, reloaded or the kernel starts.

    Acquire resources through `ctx` (`ctx.start_task`, `ctx.on_dispose`,
    `ctx.enter_async_context`, `ctx.http`) so the kernel disposes them with the plugin.
    Time-bounded by the kernel's hook timeout. Raising fails the load: the plugin's
    registry entries are withdrawn and, on reload, the previous generation is restored.
    """


@hookspec
async def nekobot_plugin_stop(ctx: PluginContext) -> None:
    """Called (async) when the plugin is disabled, reloaded, deleted or the kernel stops.

    Runs before the scope is disposed (tasks cancelled, callbacks run in reverse
    order). Time-bounded; an exception is logged against the plugin and ignored.
    """
