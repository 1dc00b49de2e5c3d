"""The contract between `neko_counter_service` and the plugins that count with it.

Plugins never import each other, so the protocol lives in a module of its own that both
import; ship it as a small distribution both plugins depend on. (Here it sits next to
the example's tests, whose folder pytest puts on `sys.path`.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class CounterService(Protocol):
    """Named counters that outlive a reload of the plugin keeping them."""

    async def increment(self, name: str) -> int:
        """Add one to the counter `name` and return its new value."""

    async def value(self, name: str) -> int:
        """The counter `name` (0 if it was never incremented)."""
