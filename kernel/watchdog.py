"""Detects a blocked event loop and names the plugin whose code is running."""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

import anyio


class LoopWatchdog:
    """A heartbeat task on the loop and a thread that notices when it stops beating.

    When the loop has not ticked for `threshold` seconds, the thread samples the loop
    thread's stack and logs the innermost frame that belongs to a plugin.
    """

    def __init__(
        self,
        threshold: float,
        attribute: Callable[[str], str | None],
        report: Callable[[str | None, str], None],
    ) -> None:
        self.threshold = threshold
        self._attribute = attribute
        self._report = report
        self._beat = time.monotonic()
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: (plugin or None, seconds blocked so far) of each detected stall.
        self.stalls: deque[tuple[str | None, float]] = deque(maxlen=1000)

    async def run(self) -> None:
        """The heartbeat; run it as a task of the kernel. Starts the watching thread."""
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="nekobot-watchdog", daemon=True)
        self._thread.start()
        try:
            while True:
                self._beat = time.monotonic()
                await anyio.sleep(self.threshold / 5)
        finally:
            self._stop.set()

    def stop(self) -> None:
        """Stop the watching thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def _watch(self) -> None:
        reported_beat = 0.0
        while not self._stop.wait(self.threshold / 5):
            beat = self._beat
            stalled = time.monotonic() - beat
            if stalled < self.threshold or beat == reported_beat:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                continue
            plugin, where = self._blame(frame)
            del frame
            reported_beat = beat
            self.stalls.append((plugin, stalled))
            if plugin is not None:
                self._report(
                    plugin, f"event loop blocked for {stalled:.2f}s by plugin {plugin!r} at {where}"
                )
            else:
                self._report(None, f"event loop blocked for {stalled:.2f}s at {where}")

    def _blame(self, frame: FrameType) -> tuple[str | None, str]:
        innermost = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        current: FrameType | None = frame
        while current is not None:
            module = current.f_globals.get("__name__", "")
            plugin = self._attribute(module) if isinstance(module, str) else None
            if plugin is not None:
                code = current.f_code
                return plugin, f"{code.co_filename}:{current.f_lineno} in {code.co_name}"
            current = current.f_back
        return None, innermost
