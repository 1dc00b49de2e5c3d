"""The message pipeline: platform event -> command registry -> handlers -> replies.

Messages of one conversation are handled in arrival order; different conversations
run concurrently. Every handler runs inside its generation's gate (so a reload waits
for it, and a message that arrives mid-swap is handled once, by the new generation)
and under a time bound.

One reply per message: a command the registry matches ends the dispatch. Any other
message is offered to the `nekobot_on_message` implementations one after the other,
highest `@priority` first (equal priorities in plugin-name order); the first that
answers, or marks the message handled, ends the dispatch unless it passes it on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import attrs
import pluggy

from kernel.adapter import Adapter, SendResult, StatsRecorder, SupportsStreaming
from kernel.calling import call_impl
from kernel.commands import CommandEntry, ParsedCommand, parse_command
from kernel.lifecycle import GateCall, GateClosedError, operating_on
from kernel.messages import ReplyStream, Text
from kernel.models import CommandInvocation, MessageEvent, Reply, Target, as_reply

if TYPE_CHECKING:
    from kernel.generations import Generation
    from kernel.kernel import Kernel

_MAX_RETRIES = 5
_MAX_SPARE = 256


#: How a handler's messages reach the conversation being handled (counted as replies).
Send = Callable[[Reply | str | None], Awaitable[None]]
#: How a handler's streamed reply reaches the conversation (counted as one reply).
SendStream = Callable[[ReplyStream], Awaitable[None]]


class MessageDispatch:
    """One `nekobot_on_message` handler's part in the dispatch of one message.

    A handler answers by returning a `Reply` or a `str` (or by sending with
    `await dispatch.send(...)`), declines by returning None, ends the dispatch without
    answering with `mark_handled()`, and lets the handlers after it have the message
    although it answered with `pass_on()`. Valid during the handler's turn only.
    """

    __slots__ = ("_acted", "_by", "_open", "_passing", "_plugin", "_send", "_stream")

    def __init__(
        self, plugin: str, handled_by: tuple[str, ...], send: Send, stream: SendStream
    ) -> None:
        self._plugin = plugin
        self._by = handled_by
        self._send = send
        self._stream = stream
        self._acted = False
        self._passing = False
        self._open = True

    @property
    def handled(self) -> bool:
        """Whether a handler (an earlier one that passed it on, or this one) answered the
        message or marked it handled."""
        return self._acted or bool(self._by)

    @property
    def handled_by(self) -> tuple[str, ...]:
        """The plugins that answered or marked the message handled, in turn order."""
        return (*self._by, self._plugin) if self._acted else self._by

    @property
    def passed_on(self) -> bool:
        """Whether this handler called `pass_on()`."""
        return self._passing

    def mark_handled(self) -> None:
        """End the dispatch after this handler even if it sends nothing (a filter that
        swallows the message); with `pass_on()`, later handlers see `handled`."""
        self._check_open("mark_handled")
        self._acted = True

    def pass_on(self) -> None:
        """Offer the message to the next handlers even though this one answers it."""
        self._check_open("pass_on")
        self._passing = True

    async def send(self, message: Reply | str) -> None:
        """Send `message` to the conversation now; this handler has then answered."""
        self._check_open("send")
        reply = as_reply(message)
        if reply is None:
            return
        self._acted = True
        await self._send(reply)

    async def stream(self, stream: ReplyStream) -> str:
        """Send a reply while it is produced: an adapter that can show it growing gets
        the pieces as they come, any other the whole text at the end. Returns the text
        sent; an exception of the stream's producer comes through once the adapter has
        seen it (this handler has then answered all the same)."""
        self._check_open("stream")
        self._acted = True
        await self._stream(stream)
        return stream.text

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise RuntimeError(
                f"dispatch.{what}() after {self._plugin!r}'s turn has ended (use ctx.send)"
            )


class _Conversation:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = anyio.Lock(fast_acquire=True)
        self.users = 0


class Pipeline:
    """Dispatches message events of one Kernel."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._conversations: dict[tuple[str, str, str], _Conversation] = {}
        # Idle conversation objects kept for reuse: creating an anyio.Lock per message of
        # an uncontended conversation is a measurable share of dispatch time.
        self._spare: list[_Conversation] = []
        #: platform instance id -> adapter that sends for it.
        self.adapters: dict[str, Adapter] = {}
        #: platform instance id -> where its sends are counted (instances opened by
        #: `kernel.adapter.open_platform`).
        self._stats: dict[str, StatsRecorder] = {}
        self.handled = 0

    # -- adapters ----------------------------------------------------------------------

    def attach(
        self, instance: str, adapter: Adapter, *, stats: StatsRecorder | None = None
    ) -> Callable[[], None]:
        """Route replies for `instance` through `adapter` (counting its sends in `stats`);
        returns the detach function."""
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"platform instance {instance!r}: {type(adapter).__name__} is not an Adapter "
                "(it needs start, stop, send, capabilities and stats)"
            )
        if instance in self.adapters and self.adapters[instance] is not adapter:
            raise ValueError(f"platform instance {instance!r} already has an adapter")
        self.adapters[instance] = adapter
        if stats is not None:
            self._stats[instance] = stats

        def detach() -> None:
            if self.adapters.get(instance) is adapter:
                del self.adapters[instance]
                self._stats.pop(instance, None)

        return detach

    async def send(self, target: Target, reply: Reply) -> SendResult:
        """Send through the adapter of `target.instance`."""
        adapter = self.adapters.get(target.instance)
        if adapter is None:
            raise LookupError(f"no platform instance {target.instance!r}")
        return await self.send_through(adapter, target, reply)

    async def send_through(self, adapter: Adapter, target: Target, reply: Reply) -> SendResult:
        """Send `reply` with `adapter`, fitted to its capabilities: segments it cannot
        send become text, and a text too long for one message is split."""
        stats = self._stats.get(target.instance)
        if stats is not None and self.adapters.get(target.instance) is not adapter:
            stats = None  # another adapter than the instance's own: not its count
        result = SendResult()
        for message in adapter.capabilities.fit(reply):
            try:
                sent = await adapter.send(target, message)
            except Exception as exc:
                if stats is not None:
                    stats.error(exc)
                raise
            if stats is not None:
                stats.sent += 1
            if isinstance(sent, SendResult):  # an untyped adapter may return None
                result += sent
        return result

    async def stream_through(
        self, adapter: Adapter, target: Target, stream: ReplyStream
    ) -> SendResult:
        """Send a streamed reply with `adapter`: as it comes if the adapter can show it
        growing (`SupportsStreaming`), else as one reply fitted like any other once the
        stream has ended."""
        if not isinstance(adapter, SupportsStreaming):
            text = await stream.drain()
            return (
                await self.send_through(adapter, target, Reply.text(text)) if text else SendResult()
            )
        stats = self._stats.get(target.instance)
        if stats is not None and self.adapters.get(target.instance) is not adapter:
            stats = None
        try:
            result = await adapter.send_stream(target, stream)
        except Exception as exc:
            if stats is not None:
                stats.error(exc)
            raise
        if stats is not None:
            stats.sent += 1
        return result if isinstance(result, SendResult) else SendResult()

    # -- dispatch ----------------------------------------------------------------------

    async def dispatch(self, event: MessageEvent, adapter: Adapter | None = None) -> int:
        """Handle one message; replies go back through `adapter`. Returns replies sent."""
        key = event.conversation
        conv = self._conversations.get(key)
        if conv is None:
            spare = self._spare
            conv = self._conversations[key] = spare.pop() if spare else _Conversation()
        conv.users += 1
        try:
            async with conv.lock:
                return await self._handle(event, adapter or self.adapters.get(event.instance))
        finally:
            conv.users -= 1
            if conv.users == 0:
                del self._conversations[key]
                if len(self._spare) < _MAX_SPARE:
                    self._spare.append(conv)  # nobody holds or waits for its lock now

    async def _handle(self, event: MessageEvent, adapter: Adapter | None) -> int:
        self.handled += 1
        sent = 0

        async def send(message: Reply | str | None) -> None:
            nonlocal sent
            reply = as_reply(message)
            if reply is None or adapter is None:
                return
            await self.send_through(adapter, event.target, reply)
            sent += 1

        async def send_stream(stream: ReplyStream) -> None:
            nonlocal sent
            if adapter is None:
                await stream.drain()
                return
            await self.stream_through(adapter, event.target, stream)
            sent += 1

        config = self.kernel.bot_config
        if config.wake_words:
            event = strip_wake_word(event, config.wake_words)
        parsed = parse_command(event.text, config.command_prefixes)
        if parsed is None and event.to_me and config.wake_words:
            # "neko help": after a wake word the command prefix is optional.
            parsed = parse_command(event.text, ("",))
            if parsed is not None and self.kernel.commands.lookup(parsed.name) is None:
                parsed = None
        if parsed is not None and await self._run_command(event, parsed, send):
            return sent
        await self._offer(event, send, send_stream)
        return sent

    async def _run_command(self, event: MessageEvent, parsed: ParsedCommand, send: Send) -> bool:
        """Run the command `parsed` names; False if no command answers it here."""
        registry = self.kernel.commands
        for _ in range(_MAX_RETRIES):
            entry = registry.lookup(parsed.name)
            if entry is None or not _in_scope(entry, event):
                return False
            gen: Generation = entry.generation  # type: ignore[assignment]
            try:
                call = gen.gate.enter(f"command {entry.qualified!r}")
            except GateClosedError:
                await self.kernel.plugins.settled(entry.owner)
                continue
            try:
                await self._call_handler(entry, gen, call, event, parsed, send)
            finally:
                gen.gate.leave(call)
            return True
        self.kernel.log.error(
            "command %r: plugin %r kept changing; message dropped",
            parsed.name,
            entry.owner if entry else "?",
        )
        return True

    async def _call_handler(
        self,
        entry: CommandEntry,
        gen: Generation,
        call: GateCall,
        event: MessageEvent,
        parsed: ParsedCommand,
        send: Send,
    ) -> None:
        spec = entry.spec
        ctx = gen.ctx
        assert ctx is not None
        if spec.permission == "admin" and not self.kernel.is_admin(event):
            await send(f"You are not allowed to use {parsed.prefix}{parsed.name}.")
            return
        invocation = CommandInvocation(
            event, entry.name, parsed.args, parsed.argv, parsed.prefix, ctx, send
        )
        timeout = spec.timeout or self.kernel.config.handler_timeout
        result: Reply | str | None = None
        # The call's scope is both the time bound (a bare deadline: what fail_after does,
        # minus two generator layers) and what the gate cancels if the plugin is retired.
        scope = call.cancel_scope
        scope.deadline = anyio.current_time() + timeout
        try:
            with scope:
                result = await spec.handler(invocation)
        except Exception as exc:
            ctx.log.error(
                "command %r raised %s: %s", entry.qualified, type(exc).__name__, exc, exc_info=True
            )
            await send(f"{parsed.prefix}{parsed.name} failed.")
            return
        if scope.cancelled_caught and call.cancelled:  # retired, and it outlived the wait
            await send(f"{parsed.prefix}{parsed.name} failed.")
            return
        if scope.cancelled_caught:
            ctx.log.error("command %r timed out after %.1fs", entry.qualified, timeout)
            await send(f"{parsed.prefix}{parsed.name} timed out.")
            return
        await send(_checked_reply(result, ctx.log, entry.qualified))

    async def _offer(self, event: MessageEvent, send: Send, send_stream: SendStream) -> None:
        """Offer a non-command message to the `nekobot_on_message` implementations in
        turn (the hook index holds them in priority order) until one answers it."""
        impls = self.kernel.plugins.hook_index.get("nekobot_on_message")
        if not impls:
            return
        timeout = self.kernel.config.handler_timeout
        handled_by: tuple[str, ...] = ()
        # The index is replaced, never changed in place: a reload meanwhile does not
        # reorder this loop. A generation going away is skipped (its gate refuses the
        # call) and its successor is not offered a re-run.
        for plugin, impl, gen in impls:
            ctx = gen.ctx
            log = ctx.log if ctx is not None else self.kernel.log
            dispatch = MessageDispatch(plugin, handled_by, send, send_stream)
            for _ in range(_MAX_RETRIES):
                outcome = await call_impl(
                    impl,
                    {"event": event, "ctx": ctx, "dispatch": dispatch},
                    plugin=plugin,
                    hook="nekobot_on_message",
                    timeout=timeout,
                    log=log,
                    gate=gen.gate,
                )
                if not isinstance(outcome.error, GateClosedError):
                    break
                # Its generation is going away: the message waits for the successor, as a
                # command does, unless this very task is that plugin's operation.
                successor = await self._successor(plugin, gen)
                if successor is None:
                    break
                impl, gen = successor
                ctx = gen.ctx
                log = ctx.log if ctx is not None else self.kernel.log
            dispatch._open = False
            # A handler that failed after sending has answered all the same.
            if outcome.error is None and outcome.value is not None:
                reply = _checked_reply(outcome.value, log, plugin)
                if reply is not None:
                    dispatch._acted = True
                    await send(reply)
            if dispatch._acted:
                if not dispatch._passing:
                    return
                handled_by = dispatch.handled_by

    async def _successor(
        self, plugin: str, gen: Generation
    ) -> tuple[pluggy.HookImpl, Generation] | None:
        """After `plugin`'s operation, its new generation's `nekobot_on_message`, if the
        plugin is still active and still implements it."""
        if operating_on(plugin):
            return None
        await self.kernel.plugins.settled(plugin)
        for name, impl, current in self.kernel.plugins.hook_index.get("nekobot_on_message", ()):
            if name == plugin:
                return None if current is gen else (impl, current)
        return None


def strip_wake_word(event: MessageEvent, wake_words: Sequence[str]) -> MessageEvent:
    """If the message starts with a wake word, drop it and mark the event `to_me`."""
    segments = event.segments
    if not segments or not isinstance(segments[0], Text):
        return event
    text = segments[0].text
    stripped = text.lstrip()
    folded = stripped.casefold()
    for word in sorted(wake_words, key=len, reverse=True):
        w = word.casefold()
        if folded.startswith(w) and (len(folded) == len(w) or not folded[len(w)].isalnum()):
            rest = stripped[len(word) :].lstrip(" ,:\uff0c\uff1a")  # also full-width , :
            first = Text(rest)
            return attrs.evolve(event, segments=(first, *segments[1:]), to_me=True)
    return event


def _in_scope(entry: CommandEntry, event: MessageEvent) -> bool:
    platforms = entry.spec.platforms
    return platforms is None or event.platform in platforms


def _checked_reply(
    value: object, log: logging.Logger | logging.LoggerAdapter[logging.Logger], who: str
) -> Reply | None:
    try:
        return as_reply(value)  # type: ignore[arg-type]
    except TypeError as exc:
        log.error("%s: %s", who, exc)
        return None
