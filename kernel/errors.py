"""Typed errors of the kernel. The HTTP layer maps them to status codes in one place."""

from __future__ import annotations


class NekoError(Exception):
    """Base class of every error the kernel raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PluginError(NekoError):
    """A plugin operation failed; `plugin` names the plugin."""

    code = "plugin_error"

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class PluginNotFoundError(PluginError):
    """No plugin of that name is known to the kernel."""

    code = "plugin_not_found"

    def __init__(self, plugin: str) -> None:
        super().__init__(plugin, f"no plugin named {plugin!r}")


class EssentialPluginError(PluginError):
    """The operation would disable or delete an essential plugin."""

    code = "essential_plugin"


class PluginLoadError(PluginError):
    """Importing, validating or starting a plugin failed."""

    code = "plugin_load_failed"


class ReloadError(PluginError):
    """A reload failed; the previous generation is still serving."""

    code = "reload_failed"


class ManifestError(NekoError):
    """A plugin manifest is missing or invalid; `field` names the offending field."""

    code = "invalid_manifest"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"manifest field {field!r}: {message}")
        self.field = field


class InstallError(NekoError):
    """A plugin archive was rejected; nothing was written."""

    code = "invalid_plugin_archive"


class PluginExistsError(InstallError):
    """The archive's plugin name is taken by an installed plugin (and not replaceable)."""

    code = "plugin_exists"


class ConflictError(NekoError):
    """Two owners claim the same key in a registry that does not allow sharing."""

    code = "conflict"

    def __init__(self, kind: str, key: str, holder: str, newcomer: str) -> None:
        super().__init__(f"{kind} {key!r} is already registered by plugin {holder!r}")
        self.kind = kind
        self.key = key
        self.holder = holder
        self.newcomer = newcomer


class CommandNotFoundError(NekoError):
    """The command registry knows no such command, claim or admin alias."""

    code = "command_not_found"


class ContributionError(NekoError):
    """A plugin contributed something malformed (wrong type, duplicate inside the plugin)."""

    code = "invalid_contribution"


class DisposedError(NekoError):
    """The plugin's scope was disposed; its context refuses new work."""

    code = "disposed"


class ConfigError(NekoError):
    """A configuration value is invalid; `field` names it."""

    code = "invalid_config"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RequestTooLargeError(NekoError):
    """A request body is larger than its route accepts (`limit` bytes)."""

    code = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit
