"""Command hooks: what a plugin answers to `/name args`."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.hookspecs.markers import hookspec
from kernel.models import CommandSpec


@hookspec
def nekobot_commands() -> Iterable[CommandSpec]:
    """Return the commands the plugin provides.

    Contribution hook: sync, pure, called once per load. Each command is registered
    under its owner; keys (name and aliases) are case-folded. A key claimed twice
    inside one plugin is a load error; a key another plugin holds is recorded as a
    conflict and the command stays reachable as `plugin:name`. The kernel withdraws
    the commands when the plugin goes away.
    """
