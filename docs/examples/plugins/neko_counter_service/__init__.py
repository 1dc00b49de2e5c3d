"""neko_counter_service: provides `CounterService`, counters kept in the plugin's store
(so they survive a reload of this plugin, and so do the handles of its users)."""

from __future__ import annotations

from neko_counter_api import CounterService

from kernel import PluginContext, hookimpl
from kernel.storage import PluginStore

#: What `ctx.provide` may offer: the kernel starts the plugins requiring it after this one.
provides = (CounterService,)


class StoredCounters:
    """`CounterService`, kept in a plugin store."""

    def __init__(self, store: PluginStore) -> None:
        self.store = store

    async def increment(self, name: str) -> int:
        count = await self.value(name) + 1
        await self.store.kv_set(f"count:{name}", count)
        return count

    async def value(self, name: str) -> int:
        count = await self.store.kv_get(f"count:{name}")
        return count if isinstance(count, int) else 0


@hookimpl
async def nekobot_plugin_start(ctx: PluginContext) -> None:
    ctx.provide(CounterService, StoredCounters(ctx.store))
