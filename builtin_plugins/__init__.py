"""Plugins shipped with NekoBot. Each is a normal plugin; the essential ones cannot be
disabled or deleted, so the API can never lock itself out."""

#: Every builtin plugin, in no particular order (the kernel sorts).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "api",
    "auth",
    "plugin_admin",
    "commands_admin",
    "settings",
    "logs",
    "help",
)

#: Builtins that cannot be disabled or deleted.
ESSENTIAL_PLUGINS: frozenset[str] = frozenset({"api", "auth", "plugin_admin"})
