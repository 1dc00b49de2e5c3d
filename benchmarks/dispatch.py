"""Message dispatch throughput: messages/second through `kernel.pipeline.dispatch`.

A kernel (no builtins beyond the essential ones) runs one directory plugin with 1,000
commands (cmd0..cmd999). Events are built up front, so the figures measure the kernel
(parse, lookup, conversation lock, gate, time bound, invocation, reply) and not event
construction. Figures:

* sequential: one conversation, one message after the other;
* concurrent: 100 conversations, one task each, all in one task group;
* spawned: 100 conversations, a task per message;
* chat_1: messages that are not commands, one conversation, one `nekobot_on_message`
  implementation (the benchmark plugin's) answering each;
* chat_3: the same with two more plugins offered the message first, both declining;
* baseline: the same loop doing only a dict lookup and the handler call; the
  kernel/baseline ratio stays comparable across machines.

Each is given by the wall clock and per CPU-second of the loop's thread: on a busy
machine (other processes sharing the core) only the latter stays meaningful. The
process is pinned to one CPU where the platform allows it.

Run: `python -m benchmarks.dispatch [--messages N] [--repeat R] [--quick] [--profile]`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import io
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from benchmarks import machine_note, median, pinned_to_one_core, verdict, write_bench_plugin

PLUGIN = "zz_bench_dispatch"
COMMANDS = 1000
CONVERSATIONS = 100
#: The command the ordering check uses; it sleeps a little, unevenly.
UNEVEN = "zzuneven"
TARGET_MSG_PER_S = 20_000.0
#: Plugins that decline every message; named to come before PLUGIN (same priority).
DECLINERS = ("zz_bench_decline_a", "zz_bench_decline_b")

_PLUGIN_SOURCE = f'''\
"""Benchmark plugin: {COMMANDS} trivial commands, and one that takes its time."""

import anyio

from kernel import CommandSpec, hookimpl


async def _handler(cmd):
    return cmd.args


async def _uneven(cmd):
    # Messages take 0, 0.5 or 1 ms: without per-conversation ordering, replies would overtake.
    await anyio.sleep(0.0005 * (int(cmd.args) % 3))
    return cmd.args


@hookimpl
def nekobot_commands():
    return [
        *(CommandSpec(f"cmd{{i}}", _handler) for i in range({COMMANDS})),
        CommandSpec("{UNEVEN}", _uneven),
    ]


@hookimpl
async def nekobot_on_message(event, ctx):
    return event.text
'''

_DECLINER_SOURCE = '''\
"""Benchmark plugin: offered every message that is not a command; declines it."""

from kernel import hookimpl


@hookimpl
async def nekobot_on_message(event, ctx):
    return None
'''


def write_plugin(plugin_dir: Path) -> None:
    """The benchmark plugins, as directory plugins under `plugin_dir`."""
    write_bench_plugin(plugin_dir, PLUGIN, _PLUGIN_SOURCE, "dispatch benchmark")
    for name in DECLINERS:
        write_bench_plugin(plugin_dir, name, _DECLINER_SOURCE, "dispatch benchmark: declines")


class CountingAdapter:
    """A MockBot-style adapter that counts replies; with `yields`, each send yields once
    to the event loop, as a real adapter writing to a socket would."""

    def __init__(self, *, yields: bool = True) -> None:
        self.sent = 0
        self.yields = yields

    async def send(self, target: Any, reply: Any) -> None:
        """Adapter side: count a reply."""
        self.sent += 1
        if self.yields:
            await anyio.lowlevel.checkpoint()


class RecordingAdapter:
    """Records (chat id, reply text) in order, to check per-conversation ordering."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, target: Any, reply: Any) -> None:
        """Adapter side: record a reply, then yield like a real adapter."""
        self.sent.append((target.chat_id, reply.plain_text))
        await anyio.lowlevel.checkpoint()


def _events(bot: Any, n: int, conversations: int, kind: str) -> list[Any]:
    """`n` events spread round-robin over `conversations` chats.

    For commands, message i is `/cmd<i mod 1000> <i>`; the handler answers its arguments,
    so replies show the order messages were handled in. Otherwise it is `hello <i>`,
    which `nekobot_on_message` echoes.
    """
    return [
        bot.event(
            f"/cmd{i % COMMANDS} {i}" if kind == "command" else f"hello {i}",
            chat_id=f"chat-{i % conversations}",
        )
        for i in range(n)
    ]


#: (wall seconds, CPU seconds of this thread). Everything runs on the event loop's thread,
#: so CPU time is what the kernel costs even when other processes share the core.
Elapsed = tuple[float, float]


#: Handles one message (an event, or for the baselines a command name).
Handle = Callable[[Any], Coroutine[Any, Any, None]]


def _now() -> Elapsed:
    return time.perf_counter(), time.thread_time()


def _since(start: Elapsed) -> Elapsed:
    return time.perf_counter() - start[0], time.thread_time() - start[1]


# -- drivers: how messages reach a per-message coroutine function ---------------------


async def _one_by_one(handle: Handle, items: list[Any]) -> Elapsed:
    start = _now()
    for item in items:
        await handle(item)
    return _since(start)


async def _per_conversation(handle: Handle, items: list[Any]) -> Elapsed:
    """One task per conversation, each handling its own messages in order."""
    by_conv = [items[i::CONVERSATIONS] for i in range(CONVERSATIONS)]

    async def worker(mine: list[Any]) -> None:
        for item in mine:
            await handle(item)

    start = _now()
    async with anyio.create_task_group() as tg:
        for mine in by_conv:
            tg.start_soon(worker, mine)
    return _since(start)


async def _per_message(handle: Handle, items: list[Any]) -> Elapsed:
    """Every message in its own task of one task group, as many adapters spawn them."""
    start = _now()
    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(handle, item)
    return _since(start)


Driver = Callable[[Handle, list[Any]], Awaitable[Elapsed]]

#: scenario -> (driver, conversations, kind, description); kind is "command" or the
#: number of `nekobot_on_message` implementations a non-command message is offered to.
SCENARIOS: dict[str, tuple[Driver, int, str, str]] = {
    "sequential": (_one_by_one, 1, "command", "1 conversation, one message at a time"),
    "concurrent": (
        _per_conversation,
        CONVERSATIONS,
        "command",
        f"{CONVERSATIONS} conversations, a task each",
    ),
    "spawned": (
        _per_message,
        CONVERSATIONS,
        "command",
        f"{CONVERSATIONS} conversations, a task per message",
    ),
    "chat_1": (_one_by_one, 1, "1", "no command, 1 on_message impl answers"),
    "chat_3": (_one_by_one, 1, "3", "no command, 2 impls decline, then 1 answers"),
}


def _kernel_handle(kernel: Any, adapter: Any) -> Handle:
    return functools.partial(kernel.pipeline.dispatch, adapter=adapter)


async def _offered_to(kernel: Any, kind: str) -> None:
    """Enable the declining plugins for `kind` "3", disable them otherwise."""
    from kernel import PluginState

    for name in DECLINERS:
        enabled = kernel.plugins.info(name).state is PluginState.ACTIVE
        if kind == "3" and not enabled:
            await kernel.plugins.enable(name)
        elif kind != "3" and enabled:
            await kernel.plugins.disable(name)


def _chat_baseline_handle(kernel: Any, adapter: Any) -> Handle:
    """The floor for a non-command message: the answering hookimpl called, then the send."""
    [function] = [
        impl.function
        for plugin, impl, _ in kernel.plugins.hook_index["nekobot_on_message"]
        if plugin == PLUGIN
    ]
    ctx = kernel.plugins.record(PLUGIN).generation.ctx
    send = adapter.send

    async def handle(event: Any) -> None:
        await send(event.target, await function(event, ctx))

    return handle


def _baseline_handle(kernel: Any, adapter: Any, sample: Any) -> Handle:
    """The floor: a dict lookup, the same handler with a pre-built invocation, the send."""
    from kernel.models import CommandInvocation

    entries = {e.name: e for e in kernel.commands.entries() if e.owner == PLUGIN}
    table = {name: entry.spec.handler for name, entry in entries.items()}
    ctx = entries["cmd0"].generation.ctx
    send, target = adapter.send, sample.target

    async def no_send(message: Any) -> None:
        return None

    invocation = CommandInvocation(sample, "cmd0", "0", ("0",), "/", ctx, no_send)

    async def handle(name: str) -> None:
        await send(target, await table[name](invocation))

    return handle


async def _check_order(kernel: Any, bot: Any, per_conversation: int) -> None:
    """Untimed: under concurrency, each conversation's replies keep its messages' order."""
    events = [
        bot.event(f"/{UNEVEN} {i}", chat_id=f"chat-{i % CONVERSATIONS}")
        for i in range(per_conversation * CONVERSATIONS)
    ]
    recorder = RecordingAdapter()
    await _per_message(_kernel_handle(kernel, recorder), events)
    expected: dict[str, list[str]] = {}
    for event in events:
        expected.setdefault(event.chat_id, []).append(event.text.partition(" ")[2])
    got: dict[str, list[str]] = {}
    for chat, text in recorder.sent:
        got.setdefault(chat, []).append(text)
    if got != expected:
        raise RuntimeError("replies of a conversation came out of order (or went missing)")


async def _checked(timed: Awaitable[Elapsed], adapter: CountingAdapter, n: int) -> Elapsed:
    """Await one timed pass (after a full GC) and check every message got its reply."""
    gc.collect()
    before = adapter.sent
    elapsed = await timed
    if adapter.sent - before != n:
        raise RuntimeError(f"{adapter.sent - before} replies to {n} messages")
    return elapsed


async def _run(opts: argparse.Namespace) -> tuple[dict[str, float], str]:
    from kernel.testing import MockBot, running_kernel

    n = opts.messages
    with tempfile.TemporaryDirectory(prefix="nekobot-bench-") as tmp:
        root = Path(tmp)
        write_plugin(root / "plugins")
        async with running_kernel(root / "data", plugin_dirs=[root / "plugins"]) as kernel:
            if len(kernel.commands.owned_by(PLUGIN)) != COMMANDS + 1:
                raise RuntimeError(f"benchmark plugin did not load: {kernel.plugins.info(PLUGIN)}")
            bot = MockBot(kernel)
            await _check_order(kernel, bot, per_conversation=6)
            adapter = CountingAdapter(yields=not opts.no_yield)
            on_kernel = _kernel_handle(kernel, adapter)
            inputs = {}
            for name, (_, conversations, kind, _) in SCENARIOS.items():
                events = _events(bot, n, conversations, kind)
                if kind == "command":
                    inputs[name] = (events, [e.text[1:].partition(" ")[0] for e in events])
                else:
                    inputs[name] = (events, events)
            on_command_baseline = _baseline_handle(kernel, adapter, inputs["sequential"][0][0])
            on_chat_baseline = _chat_baseline_handle(kernel, adapter)

            passes: dict[str, list[Elapsed]] = {}
            for _ in range(opts.repeat + 1):  # the first round warms up and is not counted
                for name, (drive, _, kind, _) in SCENARIOS.items():
                    await _offered_to(kernel, kind)
                    events, names = inputs[name]
                    on_baseline = on_command_baseline if kind == "command" else on_chat_baseline
                    kernel_pass = await _checked(drive(on_kernel, events), adapter, n)
                    base_pass = await _checked(drive(on_baseline, names), adapter, n)
                    passes.setdefault(name, []).append(kernel_pass)
                    passes.setdefault(f"{name}_baseline", []).append(base_pass)
            passes = {name: elapsed[1:] for name, elapsed in passes.items()}

            await _offered_to(kernel, "command")
            profile_text = ""
            if opts.profile:
                profile_text = await _profile(
                    _one_by_one(on_kernel, inputs["sequential"][0]), opts.profile_lines
                )

    figures: dict[str, float] = {}
    for name in SCENARIOS:
        kernel_passes, base_passes = passes[name], passes[f"{name}_baseline"]
        figures[f"{name}_msg_per_s"] = max(n / wall for wall, _ in kernel_passes)
        figures[f"{name}_msg_per_cpu_s"] = max(n / max(cpu, 1e-9) for _, cpu in kernel_passes)
        figures[f"{name}_baseline_msg_per_cpu_s"] = max(
            n / max(cpu, 1e-9) for _, cpu in base_passes
        )
        figures[f"{name}_vs_baseline"] = (
            figures[f"{name}_msg_per_cpu_s"] / figures[f"{name}_baseline_msg_per_cpu_s"]
        )
        figures[f"_{name}_median_msg_per_s"] = median([n / wall for wall, _ in kernel_passes])
    return figures, profile_text


async def _profile(timed: Awaitable[Elapsed], lines: int) -> str:
    """cProfile one pass; the top functions by own time and by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    await timed
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def _meets(rate: float) -> str:
    return verdict(rate, TARGET_MSG_PER_S, lower_is_better=False)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Measure and print dispatch throughput; returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatch", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per pass")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best one is reported")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--profile", action="store_true", help="cProfile one sequential pass")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    parser.add_argument(
        "--no-yield", action="store_true", help="the adapter's send does not yield to the loop"
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.messages, opts.repeat = 300, 1

    pinning = contextlib.nullcontext("not pinned (--no-pin)")
    with pinned_to_one_core() if not opts.no_pin else pinning as pin_note:
        figures, profile_text = anyio.run(_run, opts)

    medians = {k[1:]: figures.pop(k) for k in list(figures) if k.startswith("_")}
    target = f">= {TARGET_MSG_PER_S:,.0f} msg/s on one core"
    lines = [
        "== dispatch: kernel.pipeline.dispatch throughput ==",
        f"{machine_note()}; {pin_note}",
        f"{COMMANDS} commands and an echoing on_message in one directory plugin (+ 2 declining"
        " plugins for chat_3), pre-built events, counting adapter"
        + (" (send does not yield)" if opts.no_yield else " (send yields to the loop once)"),
        f"{opts.messages} messages per pass, best of {opts.repeat} passes after a warm-up;"
        " per-conversation order checked",
        f"  {'scenario':<50} {'msg/s':>9} {'(median)':>10} {'msg/CPU-s':>10}"
        f" {'baseline':>10} {'ratio':>7}",
    ]
    for name, (_, _, _, description) in SCENARIOS.items():
        lines.append(
            f"  {name + ': ' + description:<50} {figures[f'{name}_msg_per_s']:>9,.0f}"
            f" {medians[f'{name}_median_msg_per_s']:>10,.0f}"
            f" {figures[f'{name}_msg_per_cpu_s']:>10,.0f}"
            f" {figures[f'{name}_baseline_msg_per_cpu_s']:>10,.0f}"
            f" {figures[f'{name}_vs_baseline']:>7.4f}"
        )
    lines += [
        "  (baseline: the same driver doing only a dict lookup + handler call + send,"
        " in msg/CPU-s; ratio = kernel / baseline, CPU)",
        f"target {target}: "
        + ", ".join(f"{name} {_meets(figures[f'{name}_msg_per_s'])}" for name in SCENARIOS)
        + " (wall clock; on a busy machine trust msg/CPU-s)",
    ]
    print("\n".join(lines))
    if profile_text:
        print(profile_text)
    return figures


if __name__ == "__main__":
    main()
