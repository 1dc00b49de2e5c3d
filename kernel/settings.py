"""Runtime settings that admins change while the bot runs (stored, not constructed)."""

from __future__ import annotations

import attrs


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)  # type: ignore[attr-defined]


@attrs.frozen
class BotConfig:
    """How the bot behaves in chats."""

    #: Messages starting with one of these are commands (longest prefix wins).
    command_prefixes: tuple[str, ...] = attrs.field(default=("/",), converter=_strings)
    #: Words that address the bot in a group chat.
    wake_words: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    #: Sender ids (`id` or `platform:id`) allowed to run admin commands.
    admin_ids: tuple[str, ...] = attrs.field(default=(), converter=_strings)


@attrs.frozen
class Settings:
    """How the server behaves."""

    #: Watch plugin directories and reload plugins whose files change.
    hot_reload: bool = True
