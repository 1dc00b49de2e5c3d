"""The builtin `help` command."""

from __future__ import annotations

from collections.abc import Iterable

from kernel import CommandInvocation, CommandSpec, hookimpl


async def help_command(cmd: CommandInvocation) -> str:
    """`/help` lists the commands; `/help NAME` shows one command's usage."""
    registry = cmd.ctx.kernel.commands
    prefix = cmd.prefix
    if cmd.argv:
        entry = registry.lookup(cmd.argv[0].removeprefix(prefix))
        if entry is None:
            return f"No command {cmd.argv[0]!r}. Try {prefix}help."
        spec = entry.spec
        lines = [f"{prefix}{entry.name} — {spec.description or 'no description'}"]
        if spec.usage:
            lines.append(f"Usage: {spec.usage}")
        if len(entry.keys) > 1:
            lines.append("Aliases: " + ", ".join(prefix + k for k in entry.keys[1:]))
        lines.append(f"Plugin: {entry.owner} (always reachable as {prefix}{entry.qualified})")
        return "\n".join(lines)
    lines = ["Commands:"]
    for entry in registry.entries():
        if entry.spec.platforms is not None and cmd.event.platform not in entry.spec.platforms:
            continue
        shown = entry.name if registry.holds(entry) else entry.qualified
        lines.append(f"{prefix}{shown} — {entry.spec.description or entry.owner}")
    return "\n".join(lines)


@hookimpl
def nekobot_commands() -> Iterable[CommandSpec]:
    return [
        CommandSpec(
            "help",
            help_command,
            aliases=("h",),
            description="List commands or show one command's usage",
            usage="/help [command]",
        )
    ]
