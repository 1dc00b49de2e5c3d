"""Platform hooks: chat platform types (OneBot, Telegram, web chat, ...)."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.adapter import PlatformType
from kernel.hookspecs.markers import hookspec


@hookspec
def nekobot_platform_types() -> Iterable[PlatformType]:
    """Return the chat platform types the plugin implements.

    Contribution hook: sync, pure, called once per load. A type name another plugin
    holds is a load error. For each instance of a type, `kernel.adapter.open_platform`
    calls `factory(PlatformContext, PlatformInstance)`, which returns an `Adapter`
    (`kernel.adapter`); the adapter delivers what it receives with `ctx.deliver(event)`
    and the kernel sends replies through it, fitted to its `capabilities`. The
    instances' adapters are stopped when the plugin goes away.
    """
