"""neko_greeter: a chatty plugin that keeps to the rule of one reply per message.

It is offered messages before ordinary chat plugins (`Priority.HIGH`). A greeting it
answers, and nobody else is offered it; a message about cats it reacts to and passes
on, so the next handler can still answer; a whisper it swallows; anything else it
declines.
"""

from __future__ import annotations

from kernel import MessageDispatch, MessageEvent, PluginContext, Priority, hookimpl, priority

GREETINGS = frozenset({"hello", "hi", "hey", "meow"})


@hookimpl
@priority(Priority.HIGH)
async def nekobot_on_message(
    event: MessageEvent, ctx: PluginContext, dispatch: MessageDispatch
) -> str | None:
    words = [word.strip(",.!?") for word in event.text.casefold().split()]
    if not words:
        return None
    if words[0] == "psst":
        dispatch.mark_handled()  # not for the bot: nobody answers it
        return None
    if words[0] in GREETINGS:
        return f"Hello, {event.sender.name or 'stranger'}!"  # the answer: dispatch ends
    if "cat" in words or "cats" in words:
        dispatch.pass_on()  # a reaction: the next handler still gets the message
        return "Purr."
    return None  # declined: the next handler gets the message
