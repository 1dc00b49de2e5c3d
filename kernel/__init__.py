"""NekoBot's microkernel: hookspecs, the plugin lifecycle, registries and the pipeline."""

from kernel.config import BuiltinPlugin, KernelConfig
from kernel.context import PluginContext
from kernel.dependencies import MissingServiceError
from kernel.errors import (
    CommandNotFoundError,
    ConfigError,
    ConflictError,
    ContributionError,
    DisposedError,
    EssentialPluginError,
    InstallError,
    ManifestError,
    NekoError,
    PluginError,
    PluginExistsError,
    PluginLoadError,
    PluginNotFoundError,
    ReloadError,
)
from kernel.events import MessageDispatch
from kernel.hookspecs import Priority, hookimpl, priority
from kernel.kernel import Kernel
from kernel.models import (
    ChannelSpec,
    CommandInvocation,
    CommandSpec,
    KernelEvent,
    MCPServerSpec,
    MessageEvent,
    MiddlewareSpec,
    PlatformType,
    PluginSource,
    PluginState,
    ProviderType,
    Reply,
    RouteSpec,
    Segment,
    Sender,
    Target,
)
from kernel.services import ServiceHandle, ServiceUnavailableError
from kernel.version import __version__

__all__ = [
    "BuiltinPlugin",
    "ChannelSpec",
    "CommandInvocation",
    "CommandNotFoundError",
    "CommandSpec",
    "ConfigError",
    "ConflictError",
    "ContributionError",
    "DisposedError",
    "EssentialPluginError",
    "InstallError",
    "Kernel",
    "KernelConfig",
    "KernelEvent",
    "MCPServerSpec",
    "ManifestError",
    "MessageDispatch",
    "MessageEvent",
    "MiddlewareSpec",
    "MissingServiceError",
    "NekoError",
    "PlatformType",
    "PluginContext",
    "PluginError",
    "PluginExistsError",
    "PluginLoadError",
    "PluginNotFoundError",
    "PluginSource",
    "PluginState",
    "Priority",
    "ProviderType",
    "ReloadError",
    "Reply",
    "RouteSpec",
    "Segment",
    "Sender",
    "ServiceHandle",
    "ServiceUnavailableError",
    "Target",
    "__version__",
    "hookimpl",
    "priority",
]
