"""MCP hooks: Model Context Protocol servers a plugin ships."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.hookspecs.markers import hookspec
from kernel.models import MCPServerSpec


@hookspec
def nekobot_mcp_servers() -> Iterable[MCPServerSpec]:
    """Return the MCP servers the plugin ships (admins add more through the API).

    Contribution hook: sync, pure, called once per load. A server name another plugin
    holds is a load error; the servers are stopped when the plugin goes away.
    """
