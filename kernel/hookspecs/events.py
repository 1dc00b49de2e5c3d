"""Event hooks: messages that are not commands, and kernel events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.hookspecs.markers import hookspec
from kernel.models import KernelEvent, MessageEvent, Reply

if TYPE_CHECKING:
    from kernel.context import PluginContext
    from kernel.events import MessageDispatch


@hookspec
async def nekobot_on_message(
    event: MessageEvent, ctx: PluginContext, dispatch: MessageDispatch
) -> Reply | str | None:
    """Called (async) for a message that matched no command; one reply per message.

    Implementations are awaited one after the other, highest `@priority` first (equal
    priorities in plugin-name order), each under the handler time bound. A non-None
    result (or `dispatch.send(...)`) answers the message: it is sent back through the
    adapter that received it and the dispatch ends, unless the handler called
    `dispatch.pass_on()`. `dispatch.mark_handled()` ends it without an answer; None
    declines. An exception or timeout is logged against its plugin and the next
    implementation is offered the message. An implementation may omit `dispatch`.
    """


@hookspec
async def nekobot_on_event(event: KernelEvent, ctx: PluginContext) -> None:
    """Called (async) for each kernel event (plugin enabled/disabled/reloaded/failed, ...).

    Implementations run concurrently and are time-bounded; results are ignored.
    """
