"""A plugin generation's Scope (what it acquired, disposed in reverse) and its Gate."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from contextvars import ContextVar, Token
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from kernel.errors import DisposedError

T = TypeVar("T")
DisposeCallback = Callable[[], Awaitable[None] | None]


class GateClosedError(Exception):
    """The generation behind a gate is going away; look the target up again."""


class CallCancelledError(Exception):
    """The call's generation was retired while it ran, and it outlived the drain timeout."""


# The gate calls the current task is inside of (a task started within a call inherits
# them). Lets a call that retires its own generation (a command reloading its plugin, a
# request disabling the plugin whose middleware it passed) be neither waited for nor
# cancelled by that retirement.
_CALLS: ContextVar[tuple[GateCall, ...]] = ContextVar("nekobot_gate_calls", default=())


# The plugins whose lifecycle operation (enable, reload, ...) the current task runs,
# stop hooks included. A message it dispatches meanwhile must not wait for that operation
# to end: it would wait for itself.
_OPERATIONS: ContextVar[frozenset[str]] = ContextVar("nekobot_operations", default=frozenset())


def begin_operation(name: str) -> Token[frozenset[str]]:
    """Mark the current task as running an operation on plugin `name` (see `operating_on`);
    pass the token to `end_operation`."""
    return _OPERATIONS.set(_OPERATIONS.get() | {name})


def end_operation(token: Token[frozenset[str]]) -> None:
    """Undo `begin_operation`."""
    _OPERATIONS.reset(token)


def operating_on(name: str) -> bool:
    """Whether the current task runs (or was started by) an operation on plugin `name`."""
    return name in _OPERATIONS.get()


def detach_from_calls() -> None:
    """The current task is not part of the gate calls of the task that started it (a
    background task, an event delivery): a retirement waits for it, and may cancel it,
    like any other call."""
    _CALLS.set(())


class GateCall:
    """One call inside a gate; the gate cancels `cancel_scope` if the call outlives the
    drain timeout of a retirement (then `cancelled` is True)."""

    __slots__ = ("_label", "cancel_scope", "cancelled", "gate")

    def __init__(
        self, gate: Gate, label: str | Callable[[], str], cancel_scope: anyio.CancelScope | None
    ) -> None:
        self.gate = gate
        self._label = label
        self.cancel_scope = cancel_scope if cancel_scope is not None else anyio.CancelScope()
        self.cancelled = False

    @property
    def label(self) -> str:
        """What the call is, for the logs (made only when asked: calls are many)."""
        return self._label if isinstance(self._label, str) else self._label()


class Gate:
    """Counts calls into one plugin generation so that disposal waits for them.

    Entering is synchronous and cheap (it sits on the message hot path); closing
    refuses new calls and waits, bounded, until the ones in flight have left. A call
    runs in its `GateCall.cancel_scope`, so that one still running after the wait can
    be cancelled (`cancel`).
    """

    __slots__ = ("_calls", "_closed", "_waiters")

    def __init__(self, *, open: bool = False) -> None:
        self._calls: set[GateCall] = set()
        self._closed = not open
        self._waiters: list[tuple[frozenset[GateCall], anyio.Event]] = []

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    @property
    def in_flight(self) -> int:
        """How many calls are inside."""
        return len(self._calls)

    def enter(
        self, label: str | Callable[[], str] = "call", cancel_scope: anyio.CancelScope | None = None
    ) -> GateCall:
        """Admit one call (`label` names it in logs), or raise GateClosedError.

        Run the call in the returned `cancel_scope` and pass it to `leave`, in the same task.
        Calls that end together (one HTTP request through several plugins) may share one
        `cancel_scope` that the caller runs them all in: cancelling one cancels them all.
        """
        if self._closed:
            raise GateClosedError
        call = GateCall(self, label, cancel_scope)
        self._calls.add(call)
        _CALLS.set((*_CALLS.get(), call))
        return call

    def leave(self, call: GateCall) -> None:
        """Let one call out."""
        self._calls.discard(call)
        calls = _CALLS.get()
        if calls and calls[-1] is call:  # the usual order: last in, first out
            _CALLS.set(calls[:-1])
        else:
            _CALLS.set(tuple(c for c in calls if c is not call))
        for exempt, event in self._waiters:
            if self._calls <= exempt:
                event.set()

    def _own(self) -> frozenset[GateCall]:
        """The calls of this gate that the current task is inside of."""
        return frozenset(c for c in _CALLS.get() if c.gate is self and c in self._calls)

    async def close(self, timeout: float) -> bool:
        """Refuse new calls and wait up to `timeout` for the ones inside; True if drained.

        The caller's own calls (it runs inside this gate) are not waited for.
        """
        self._closed = True
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` until no call but the caller's own is inside; True if so."""
        exempt = self._own()
        if self._calls <= exempt:
            return True
        waiter = (exempt, anyio.Event())
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(timeout):
                await waiter[1].wait()
        finally:
            self._waiters.remove(waiter)
        return self._calls <= exempt

    def cancel(self) -> list[str]:
        """Cancel the calls inside (not the caller's own); the labels of those cancelled."""
        exempt = self._own()
        labels = []
        for call in self._calls - exempt:
            if not call.cancelled:
                call.cancelled = True
                call.cancel_scope.cancel()
                labels.append(call.label)
        return sorted(labels)

    def open(self) -> None:
        """Admit calls (a gate starts closed until its generation has started)."""
        self._closed = False


class TaskHandle:
    """A background task started through a plugin's context."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancel_scope = anyio.CancelScope()
        self.done = anyio.Event()

    def cancel(self) -> None:
        """Ask the task to stop."""
        self.cancel_scope.cancel()

    async def wait(self) -> None:
        """Wait until the task has finished."""
        await self.done.wait()


class Scope:
    """Everything one plugin generation acquired; disposed in reverse order, once.

    Each dispose step is time-bounded, and its errors are logged, not raised. After
    disposal the scope (and so the plugin's context) refuses new work.
    """

    def __init__(
        self,
        owner: str,
        task_group: TaskGroup,
        log: logging.LoggerAdapter[logging.Logger],
        step_timeout: float = 5.0,
    ) -> None:
        self.owner = owner
        self._tg = task_group
        self._log = log
        self._step_timeout = step_timeout
        self._callbacks: list[tuple[str, DisposeCallback]] = []
        self._tasks: set[TaskHandle] = set()
        self._closed = False
        self._disposing = False
        self._disposed = False

    @property
    def closed(self) -> bool:
        """True once disposal has begun."""
        return self._closed

    @property
    def disposed(self) -> bool:
        """True once disposal has completed (every task stopped, every callback run)."""
        return self._disposed

    @property
    def live_tasks(self) -> int:
        """How many background tasks of this scope are still running."""
        return len(self._tasks)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise DisposedError(f"plugin {self.owner!r} was disposed; cannot {what}")

    def on_dispose(
        self, callback: DisposeCallback, *, name: str | None = None
    ) -> Callable[[], None]:
        """Run `callback` (sync or async) when the scope is disposed; last added runs first.

        Returns a function that withdraws the callback (for resources released earlier).
        """
        self._check_open("register a dispose callback")
        item = (name or str(getattr(callback, "__qualname__", "callback")), callback)
        self._callbacks.append(item)

        def withdraw() -> None:
            # By identity: two registrations of one callback are two items.
            for i in range(len(self._callbacks) - 1, -1, -1):
                if self._callbacks[i] is item:
                    del self._callbacks[i]
                    return

        return withdraw

    def start_task(
        self, func: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None
    ) -> TaskHandle:
        """Run `func(*args)` in the background until it returns or the scope is disposed."""
        self._check_open("start a task")
        handle = TaskHandle(name or str(getattr(func, "__qualname__", "task")))
        self._tasks.add(handle)
        self._tg.start_soon(self._run_task, handle, func, args, name=f"{self.owner}:{handle.name}")
        return handle

    async def _run_task(
        self, handle: TaskHandle, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
    ) -> None:
        detach_from_calls()  # not part of the call that may have started it
        try:
            with handle.cancel_scope:
                await func(*args)
        except Exception:
            self._log.exception("background task %r crashed", handle.name)
        finally:
            self._tasks.discard(handle)
            handle.done.set()

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter `cm` now and exit it when the scope is disposed."""
        self._check_open("enter a context")
        stack = AsyncExitStack()
        value = await stack.enter_async_context(cm)
        if self._closed:  # disposal began while `cm` was entering: nothing would exit it
            with anyio.CancelScope(shield=True):
                await self._run_callback(f"exit {type(cm).__name__}", stack.aclose)
            self._check_open("enter a context")
        self._callbacks.append((f"exit {type(cm).__name__}", stack.aclose))
        return value

    async def dispose(self) -> None:
        """Cancel the tasks, then run the callbacks in reverse order. Idempotent."""
        self._closed = True
        if self._disposing:
            return
        self._disposing = True
        try:
            await self._dispose()
        finally:
            self._disposed = True

    async def _dispose(self) -> None:
        for handle in list(self._tasks):
            handle.cancel()
        with anyio.CancelScope(shield=True):
            for handle in list(self._tasks):
                with anyio.move_on_after(self._step_timeout) as cs:
                    await handle.wait()
                if cs.cancelled_caught:
                    self._log.error(
                        "task %r did not stop within %.1fs", handle.name, self._step_timeout
                    )
            while self._callbacks:
                name, callback = self._callbacks.pop()
                await self._run_callback(name, callback)

    async def _run_callback(self, name: str, callback: DisposeCallback) -> None:
        try:
            with anyio.fail_after(self._step_timeout):
                result = callback()
                if inspect.isawaitable(result):
                    await result
        except TimeoutError:
            self._log.error("dispose step %r timed out after %.1fs", name, self._step_timeout)
        except Exception:
            self._log.exception("dispose step %r failed", name)
