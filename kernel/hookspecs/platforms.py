"""Platform hooks: chat platform types (OneBot, Telegram, web chat, ...)."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.hookspecs.markers import hookspec
from kernel.models import PlatformType


@hookspec
def nekobot_platform_types() -> Iterable[PlatformType]:
    """Return the chat platform types the plugin implements.

    Contribution hook: sync, pure, called once per load. A type name another plugin
    holds is a load error. Instances of a type are created by admins; their adapters
    are stopped when the plugin goes away.
    """
