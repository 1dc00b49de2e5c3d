"""Configuration hooks: a plugin's own settings and their live changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kernel.hookspecs.markers import hookspec

if TYPE_CHECKING:
    from kernel.context import PluginContext


@hookspec
def nekobot_config_schema() -> Mapping[str, Any] | None:
    """Return the JSON Schema (draft 2020-12) of the plugin's configuration, or None.

    Contribution hook: sync, pure, called once per load. A schema in the manifest
    (`[config_schema]` in `plugin.toml`) is used when no hookimpl returns one. Defaults
    in the schema fill `ctx.config`; writes are validated against it.
    """


@hookspec
async def nekobot_config_changed(ctx: PluginContext, config: Mapping[str, Any]) -> None:
    """Called (async) after an admin changed the plugin's configuration.

    `ctx.config` already holds the new, validated value. A plugin that does not
    implement this hook is reloaded to apply its new configuration instead.
    """
