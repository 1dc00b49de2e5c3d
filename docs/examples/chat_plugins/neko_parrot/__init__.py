"""neko_parrot: answers what nobody else did, as an LLM chat plugin would."""

from __future__ import annotations

from kernel import MessageDispatch, MessageEvent, Priority, hookimpl, priority


@hookimpl
@priority(Priority.FALLBACK)
async def nekobot_on_message(event: MessageEvent, dispatch: MessageDispatch) -> str:
    if dispatch.handled:  # someone answered and passed the message on
        return f"{', '.join(dispatch.handled_by)} said it; and I say: {event.text}"
    return f"You said: {event.text}"
