"""Event hooks: messages that are not commands, and kernel events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.hookspecs.markers import hookspec
from kernel.models import KernelEvent, MessageEvent, Reply

if TYPE_CHECKING:
    from kernel.context import PluginContext


@hookspec
async def nekobot_on_message(event: MessageEvent, ctx: PluginContext) -> Reply | str | None:
    """Called (async) for a message that matched no command.

    Every implementation is awaited concurrently under the handler time bound; each
    non-None result is sent back through the adapter that received the message, in
    plugin-name order. An exception is logged against its plugin.
    """


@hookspec
async def nekobot_on_event(event: KernelEvent, ctx: PluginContext) -> None:
    """Called (async) for each kernel event (plugin enabled/disabled/reloaded/failed, ...).

    Implementations run concurrently and are time-bounded; results are ignored.
    """
