"""Plugins shipped with NekoBot. Each is a normal plugin; the essential ones cannot be
disabled or deleted, so the API can never lock itself out.

The kernel does not import this package by name: `BUILTINS` is registered in the
`nekobot.builtins` entry-point group (pyproject.toml), which the kernel reads.
"""

from kernel.config import BuiltinPlugin

#: Builtins that cannot be disabled or deleted.
ESSENTIAL_PLUGINS: frozenset[str] = frozenset({"api", "auth", "plugin_admin"})

#: Every builtin plugin, in no particular order (the kernel sorts).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "api",
    "auth",
    "plugin_admin",
    "commands_admin",
    "settings",
    "logs",
    "help",
    "llm_openai",
)

#: What the `nekobot.builtins` entry point names.
BUILTINS: tuple[BuiltinPlugin, ...] = tuple(
    BuiltinPlugin(name, f"builtin_plugins.{name}", name in ESSENTIAL_PLUGINS)
    for name in BUILTIN_PLUGINS
)
