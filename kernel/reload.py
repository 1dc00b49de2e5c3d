"""Hot reload: watch plugin directories and reload the plugins whose files changed.

Each change goes through the same transactional `reload` as the API: a broken edit
leaves the previous generation serving, and the failure is logged and emitted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import watchfiles

from kernel.errors import NekoError
from kernel.models import PluginSource

if TYPE_CHECKING:
    from kernel.kernel import Kernel


class HotReloader:
    """Watches one kernel's plugin directories (debounced) while it runs."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._stop = anyio.Event()
        self._done = anyio.Event()
        self._ready = anyio.Event()
        self.reloads = 0

    async def start(self) -> None:
        """Create missing plugin directories and start watching them."""
        dirs = [d.resolve() for d in self.kernel.config.plugin_dirs]
        for d in dirs:
            await anyio.Path(d).mkdir(parents=True, exist_ok=True)
        self.kernel.task_group.start_soon(self._watch, dirs, name="nekobot-hot-reload")
        await self._ready.wait()

    async def stop(self) -> None:
        """Stop watching and wait for the watcher to finish."""
        self._stop.set()
        await self._done.wait()

    async def _watch(self, dirs: list[Path]) -> None:
        try:
            self._ready.set()
            async for changes in watchfiles.awatch(
                *dirs,
                debounce=self.kernel.config.reload_debounce_ms,
                step=20,
                stop_event=self._stop,
                watch_filter=watchfiles.DefaultFilter(),
                recursive=True,
                yield_on_timeout=False,
            ):
                await self._apply(dirs, (Path(p) for _, p in changes))
        except Exception:
            self.kernel.log.exception("hot reload watcher stopped")
        finally:
            self._ready.set()
            self._done.set()

    async def _apply(self, dirs: list[Path], paths: Iterable[Path]) -> None:
        names: set[str] = set()
        for path in paths:
            for d in dirs:
                try:
                    rel = path.relative_to(d)
                except ValueError:
                    continue
                if rel.parts and not rel.parts[0].startswith((".", "_")):
                    names.add(rel.parts[0])
        if not names:
            return
        plugins = self.kernel.plugins
        added = set(await plugins.rescan())
        for name in sorted(names):
            rec = plugins.records.get(name)
            if rec is None or rec.candidate.source is not PluginSource.USER:
                continue
            try:
                where = rec.candidate.path
                if where is not None and not await anyio.Path(where).exists():
                    await plugins.forget_vanished(name)
                elif (name in added or rec.generation is None) and rec.enabled:
                    await plugins.enable(name)
                elif rec.generation is not None:
                    await plugins.reload(name)
                self.reloads += 1
            except NekoError as exc:
                self.kernel.log.warning("hot reload of %r failed: %s", name, exc.message)
