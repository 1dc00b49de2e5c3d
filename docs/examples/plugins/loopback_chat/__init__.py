"""A chat platform that lives in memory: `await adapter.receive(chat_id, text)` is a
user's message, and what the bot sends lands in `adapter.outbox`."""

from __future__ import annotations

from kernel import hookimpl
from kernel.adapter import (
    AdapterStats,
    Capabilities,
    PlatformContext,
    PlatformInstance,
    PlatformType,
    SendResult,
)
from kernel.messages import MessageEvent, Reply, Sender, Target, Text

CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max_text_length": {"type": "integer", "minimum": 1, "default": 2000},
    },
}


class LoopbackAdapter:
    """One loopback instance. It sends text and mentions; everything else reaches it as
    text, and a text longer than `max_text_length` as several messages."""

    def __init__(self, ctx: PlatformContext, instance: PlatformInstance) -> None:
        self.ctx = ctx
        self.instance = instance
        self.capabilities = Capabilities(
            {"text", "mention"}, max_text_length=instance.config.get("max_text_length", 2000)
        )
        self.outbox: list[tuple[str, Reply]] = []

    @property
    def stats(self) -> AdapterStats:
        return self.ctx.stats.snapshot()

    async def start(self) -> None:
        # A real adapter connects here and reads its socket in `ctx.plugin.start_task`.
        self.ctx.stats.set_status("running")

    async def stop(self) -> None:
        self.ctx.stats.set_status("stopped")

    async def send(self, target: Target, reply: Reply) -> SendResult:
        self.outbox.append((target.chat_id, reply))
        return SendResult((str(len(self.outbox)),))

    async def receive(self, chat_id: str, text: str, user: str = "user-1") -> int:
        """A user says `text` in the group `chat_id`; returns once the bot has answered
        (with the number of replies)."""
        if self.ctx.stats.status != "running":
            raise RuntimeError(f"loopback instance {self.instance.id!r} is not running")
        event = MessageEvent(
            platform="loopback",
            instance=self.instance.id,
            chat_type="group",
            chat_id=chat_id,
            sender=Sender(user),
            segments=(Text(text),),
        )
        return await self.ctx.deliver(event)


@hookimpl
def nekobot_platform_types() -> list[PlatformType]:
    return [
        PlatformType(
            "loopback",
            LoopbackAdapter,
            config_schema=CONFIG_SCHEMA,
            description="Messages in memory, for tests and demos",
        )
    ]
