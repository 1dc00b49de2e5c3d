"""The pluggy markers of the `nekobot` project, and the priority of a hookimpl."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

import pluggy

PROJECT = "nekobot"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_F = TypeVar("_F", bound=Callable[..., Any])

#: The attribute `@priority` sets on a hookimpl function; the kernel reads it when it
#: indexes a generation's hookimpls.
PRIORITY_ATTR = "nekobot_priority"


class Priority(enum.IntEnum):
    """Named levels for `@priority`: higher goes first. Any int is accepted."""

    #: Sees a message before anyone else: filters, moderation, logging that swallows.
    FIRST = 1000
    #: Answers before ordinary chat: greeters, keyword triggers.
    HIGH = 100
    #: The default of a hookimpl without `@priority`.
    NORMAL = 0
    LOW = -100
    #: Answers only what nobody else answered: the LLM chat plugin.
    FALLBACK = -1000


def priority(level: int) -> Callable[[_F], _F]:
    """Give a `nekobot_on_message` hookimpl its place in the order messages are offered
    in (higher first; plugins of equal priority in plugin-name order)::

        @hookimpl
        @priority(Priority.HIGH)
        async def nekobot_on_message(event, ctx, dispatch): ...
    """
    if not isinstance(level, int) or isinstance(level, bool):
        raise TypeError(f"priority must be an int (or a Priority), not {type(level).__name__}")

    def mark(function: _F) -> _F:
        setattr(function, PRIORITY_ATTR, int(level))
        return function

    return mark


def priority_of(function: object) -> int:
    """The priority `@priority` gave `function`, or `Priority.NORMAL`."""
    level = getattr(function, PRIORITY_ATTR, Priority.NORMAL)
    return int(level) if isinstance(level, int) else Priority.NORMAL
