"""How kernel objects look in API responses and on the `/ws` channels (one place)."""

from __future__ import annotations

from typing import Any

from kernel.commands import CommandEntry
from kernel.logs import LogRecord
from kernel.models import CommandConflict, KernelEvent, OperationResult, PluginInfo, PluginState


def command_json(kernel: Any, entry: CommandEntry) -> dict[str, Any]:
    """One command as the API shows it."""
    spec = entry.spec
    return {
        "name": entry.name,
        "aliases": list(entry.keys[1:]),
        "admin_aliases": sorted(
            a for a, q in kernel.commands.admin_aliases.items() if q == entry.qualified
        ),
        "qualified_name": entry.qualified,
        "plugin": entry.owner,
        "description": spec.description,
        "usage": spec.usage,
        "permission": spec.permission,
        "platforms": list(spec.platforms) if spec.platforms is not None else None,
        "enabled": True,
        "holds_name": kernel.commands.holds(entry),
    }


def conflict_json(conflict: CommandConflict) -> dict[str, Any]:
    """One contested key as the API shows it."""
    return {
        "key": conflict.key,
        "candidates": [{"plugin": p, "qualified_name": q} for p, q in conflict.candidates],
        "holder": conflict.holder,
        "resolution": conflict.resolution,
    }


def plugin_json(info: PluginInfo) -> dict[str, Any]:
    """One plugin as the API shows it."""
    if info.state is PluginState.ACTIVE:
        state = "active"
    elif info.state is PluginState.FAILED:
        state = "failed"
    elif not info.enabled:
        state = "disabled"
    else:
        state = info.state.value
    return {
        "name": info.name,
        "version": info.version,
        "description": info.description,
        "author": info.author,
        "source": info.source.value,
        "essential": info.essential,
        "state": state,
        "error": info.error,
        "enabled": info.enabled,
        "commands": list(info.commands),
        "routes": list(info.routes),
        "hooks": list(info.hooks),
        "tools": list(info.tools),
        "loaded_at": info.loaded_at,
        "reload_count": info.reload_count,
        "last_reload_error": (
            None
            if info.last_reload_error is None
            else {"message": info.last_reload_error.message, "time": info.last_reload_error.time}
        ),
        "conflicts": [conflict_json(c) for c in info.conflicts],
    }


def result_json(result: OperationResult) -> dict[str, Any]:
    """The outcome of an operation: the plugin, its conflicts, whether anything changed."""
    return {
        "plugin": plugin_json(result.plugin),
        "conflicts": [conflict_json(c) for c in result.conflicts],
        "changed": result.changed,
    }


def record_json(record: LogRecord) -> dict[str, Any]:
    """One log record as the API and the `logs` channel show it."""
    return {
        "seq": record.seq,
        "time": record.time,
        "level": record.level,
        "logger": record.logger,
        "plugin": record.plugin,
        "message": record.message,
        "exc_text": record.exc_text,
    }


def event_json(event: KernelEvent) -> dict[str, Any]:
    """One kernel event as the `events` channel shows it."""
    return {
        "type": event.type,
        "plugin": event.plugin,
        "time": event.time,
        "data": dict(event.data),
    }
