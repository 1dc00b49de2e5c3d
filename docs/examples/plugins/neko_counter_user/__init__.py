"""neko_counter_user: `/count NAME`, counting with the `CounterService` that another
plugin provides; it never imports that plugin."""

from __future__ import annotations

from collections.abc import Iterable

from neko_counter_api import CounterService

from kernel import CommandInvocation, CommandSpec, hookimpl

#: Started after the plugin providing it, stopped before it goes away.
requires = (CounterService,)


async def count(cmd: CommandInvocation) -> str:
    """`/count NAME` adds one to the counter NAME."""
    if not cmd.args:
        return f"Usage: {cmd.prefix}count NAME"
    # Typed as CounterService; while its provider reloads the call waits for it.
    counter = cmd.ctx.services.get(CounterService)
    return f"{cmd.args}: {await counter.increment(cmd.args)}"


@hookimpl
def nekobot_commands() -> Iterable[CommandSpec]:
    return [CommandSpec("count", count, usage="/count NAME")]
