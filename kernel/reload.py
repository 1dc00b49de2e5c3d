"""Hot reload: watch plugin directories and reload the plugins whose files changed.

Each change goes through the same transactional `reload` as the API: a broken edit
leaves the previous generation serving, and the failure is logged and emitted.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import watchfiles

from kernel.errors import NekoError
from kernel.models import PluginSource

if TYPE_CHECKING:
    from kernel.kernel import Kernel


_ROOT_POLL_MS = 500


async def _existing(dirs: list[Path]) -> list[Path]:
    return [d for d in dirs if await anyio.Path(d).is_dir()]


Snapshot = dict[Path, int]


def _snapshot(root: Path) -> Snapshot:
    """Every file under `root` with its modification time (blocking: call it from a
    worker thread)."""
    out: Snapshot = {}
    for path in root.rglob("*"):
        try:
            out[path] = path.stat().st_mtime_ns
        except OSError:  # removed meanwhile
            continue
    return out


#: What the watcher reacts to, with how each file looked: its content is the same while
#: (inode, size, mtime) are.
PluginFiles = dict[str, tuple[int, int, int]]

_WATCHED = watchfiles.DefaultFilter()


def plugin_files(root: Path) -> PluginFiles:
    """The files under a plugin's directory that the watcher watches (blocking: call it
    from a worker thread). Directories are left out: one changes when Python writes
    its bytecode cache into it."""
    out: PluginFiles = {}
    for top, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if _WATCHED(watchfiles.Change.modified, f"{top}/{d}")]
        for name in files:
            path = os.path.join(top, name)
            if not _WATCHED(watchfiles.Change.modified, path):
                continue
            try:
                st = os.stat(path)
            except OSError:  # removed meanwhile
                continue
            out[os.path.relpath(path, root)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _differences(before: Snapshot, after: Snapshot) -> list[Path]:
    """Files added, removed or modified between two snapshots."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


class HotReloader:
    """Watches one kernel's plugin directories (debounced) while it runs."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._stop = anyio.Event()
        self._done = anyio.Event()
        self._ready = anyio.Event()
        self.reloads = 0
        #: (plugin, what the watcher did about its changed files), oldest first: one of
        #: "enabled", "reloaded", "unchanged", "forgotten", "failed". Tests wait on it.
        self.outcomes: collections.deque[tuple[str, str]] = collections.deque(maxlen=256)

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
            present = await _existing(dirs)
            # Roots loaded anew, and what they held then: an edit made before their new
            # watch exists would be missed, so the first look after it compares.
            catch_up: dict[Path, Snapshot] = {}
            while not self._stop.is_set():
                touched: set[Path] = set()
                if present:
                    touched = await self._watch_until_a_root_changes(dirs, present, catch_up)
                else:
                    self._ready.set()
                    with anyio.move_on_after(_ROOT_POLL_MS / 1000):
                        await self._stop.wait()
                now = await _existing(dirs)
                for gone in sorted(set(present) - set(now)):
                    self.kernel.log.warning(
                        "plugin directory %s is gone; hot reload resumes when it is back", gone
                    )
                # A root that came back (or was replaced) is watched anew: load what is in it.
                for back in sorted((set(now) - set(present)) | (touched & set(now))):
                    catch_up[back] = await anyio.to_thread.run_sync(_snapshot, back)
                    children = [Path(p) async for p in anyio.Path(back).iterdir()]
                    await self._apply(dirs, children)
                present = now
        except Exception:
            self.kernel.log.exception("hot reload watcher stopped")
        finally:
            self._ready.set()
            self._done.set()

    async def _watch_until_a_root_changes(
        self, dirs: list[Path], present: list[Path], catch_up: dict[Path, Snapshot]
    ) -> set[Path]:
        """Apply changes until stopped or until a plugin directory itself was removed,
        replaced or (while one is missing) came back; return the roots that changed.

        A watch follows a directory, not its path: a root that is deleted (or
        replaced) is not watched any more, so the watch is restarted. Once the new
        watch exists, what changed in `catch_up`'s roots since their snapshot is applied
        (and `catch_up` emptied).
        """
        missing = len(present) < len(dirs)
        wake = missing or bool(catch_up)
        # Set now: the watcher exists once the loop first awaits (an edit made as soon as
        # `start` returns is seen).
        self._ready.set()
        async for changes in watchfiles.awatch(
            *present,
            debounce=self.kernel.config.reload_debounce_ms,
            step=20,
            stop_event=self._stop,
            watch_filter=watchfiles.DefaultFilter(),
            recursive=True,
            # While a root is missing, wake up now and then to look for it (and once,
            # soon, to catch up).
            rust_timeout=_ROOT_POLL_MS if wake else None,
            yield_on_timeout=wake,
        ):
            paths = [Path(p) for _, p in changes]
            for root, before in list(catch_up.items()):
                del catch_up[root]
                if root in present:
                    paths += _differences(before, await anyio.to_thread.run_sync(_snapshot, root))
            await self._apply(dirs, paths)
            touched = {p for p in paths if p in present}
            if touched or await _existing(dirs) != present:
                return touched
        return set()

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
        try:
            added = set(await plugins.rescan())
        except Exception:
            self.kernel.log.exception("hot reload: rescanning the plugin directories failed")
            return
        for name in sorted(names):
            rec = plugins.records.get(name)
            if rec is None or rec.candidate.source is not PluginSource.USER:
                continue
            outcome = "failed"
            try:
                where = rec.candidate.path
                if where is not None and not await anyio.Path(where).exists():
                    await plugins.forget_vanished(name)
                    outcome = "forgotten"
                elif (name in added or rec.generation is None) and rec.enabled:
                    done = await plugins.enable(name)
                    outcome = "enabled" if done.changed else "unchanged"
                elif rec.generation is not None:
                    # Files the serving generation was loaded from (an upload's, say)
                    # are no reason to load it again.
                    done = await plugins.reload(name, if_changed=True)
                    outcome = "reloaded" if done.changed else "unchanged"
                else:
                    continue
                if outcome != "unchanged":
                    self.reloads += 1
            except NekoError as exc:
                self.kernel.log.warning("hot reload of %r failed: %s", name, exc.message)
            except Exception:
                # Not a plugin's failure (disk, storage, ...): the watcher must survive it.
                self.kernel.log.exception("hot reload of %r failed", name)
            self.outcomes.append((name, outcome))
