"""Discovery of plugins and the import of fresh module generations.

Directory plugins are imported by a meta-path finder owned by the kernel, under their
own name, straight from source (no bytecode cache, so an edit is never masked by a
stale `.pyc`). A reload imports the new generation as fresh module objects while the
previous ones are set aside, so that a failed import can put them back.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import CodeType, ModuleType

import attrs

from kernel.config import BuiltinPlugin
from kernel.errors import ManifestError, NekoError
from kernel.manifest import MANIFEST_FILE, check_plugin_name, load_manifest
from kernel.models import PluginManifest, PluginSource

ENTRY_POINT_GROUP = "nekobot.plugins"
#: Entry points of this group name sequences of `BuiltinPlugin`: how a distribution (NekoBot
#: itself, or an application built on the kernel) offers the plugins it ships, so that the
#: kernel never imports them by name.
BUILTINS_GROUP = "nekobot.builtins"


@attrs.frozen
class PluginCandidate:
    """A plugin found on disk or in the environment, not yet imported."""

    name: str
    source: PluginSource
    module: str
    manifest: PluginManifest | None
    path: Path | None = None
    essential: bool = False
    #: Why the plugin cannot be loaded (an invalid manifest, a shadowed name, ...).
    problem: str | None = None


def _read_manifest(directory: Path) -> PluginManifest:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(MANIFEST_FILE, f"missing in {directory}")
    return load_manifest(manifest_path.read_text(encoding="utf-8"))


def _module_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def registered_builtins() -> tuple[BuiltinPlugin, ...]:
    """The builtin plugins that installed distributions register in the `nekobot.builtins`
    entry-point group (blocking: reads package metadata and imports the listed objects)."""
    found: list[BuiltinPlugin] = []
    for ep in importlib.metadata.entry_points(group=BUILTINS_GROUP):
        value = ep.load()
        items = value() if callable(value) else value
        for item in items:
            if not isinstance(item, BuiltinPlugin):
                raise TypeError(
                    f"entry point {ep.name!r} of {BUILTINS_GROUP!r} lists "
                    f"{type(item).__name__}, not BuiltinPlugin"
                )
            found.append(item)
    return tuple(found)


def discover_builtins(
    builtins: Iterable[BuiltinPlugin], names: Iterable[str] | None = None
) -> list[PluginCandidate]:
    """Candidates for `builtins` (all of them, or those named in `names`)."""
    by_name = {b.name: b for b in builtins}
    found = []
    for name in sorted(by_name) if names is None else list(names):
        builtin = by_name.get(name)
        if builtin is None:
            problem = f"no builtin plugin {name!r} is registered"
            found.append(
                PluginCandidate(name, PluginSource.BUILTIN, name, None, None, False, problem)
            )
            continue
        module = builtin.module
        directory = _module_dir(module)
        try:
            if directory is None:
                raise NekoError(f"builtin plugin module {module!r} not found")
            manifest = _read_manifest(directory)
            if manifest.name != name:
                raise ManifestError("name", f"{manifest.name!r} differs from package {name!r}")
        except NekoError as exc:
            found.append(
                PluginCandidate(
                    name, PluginSource.BUILTIN, module, None, directory, builtin.essential, str(exc)
                )
            )
            continue
        found.append(
            PluginCandidate(
                name, PluginSource.BUILTIN, module, manifest, directory, builtin.essential
            )
        )
    return found


def discover_entry_points() -> list[PluginCandidate]:
    """Plugins of installed distributions, from the `nekobot.plugins` entry-point group."""
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        directory = _module_dir(ep.module)
        problem = None
        manifest: PluginManifest | None = None
        try:
            check_plugin_name(ep.name, "entry point name")
            if directory is not None and (directory / MANIFEST_FILE).is_file():
                manifest = _read_manifest(directory)
            else:
                meta = ep.dist.metadata if ep.dist else None
                manifest = PluginManifest(
                    name=ep.name,
                    version=ep.dist.version if ep.dist else "0",
                    description=(meta["Summary"] or "") if meta else "",
                    author=(meta["Author"] or meta["Author-email"] or "") if meta else "",
                )
            if manifest.name != ep.name:
                raise ManifestError(
                    "name", f"{manifest.name!r} differs from entry point {ep.name!r}"
                )
        except NekoError as exc:
            problem = str(exc)
        found.append(
            PluginCandidate(
                ep.name, PluginSource.ENTRYPOINT, ep.module, manifest, directory, False, problem
            )
        )
    return found


def discover_directory(directory: Path) -> list[PluginCandidate]:
    """Plugin packages (a folder with `__init__.py` and `plugin.toml`) inside `directory`."""
    if not directory.is_dir():
        return []
    found = (read_directory_plugin(child) for child in sorted(directory.iterdir()))
    return [cand for cand in found if cand is not None]


def read_directory_plugin(child: Path) -> PluginCandidate | None:
    """The directory plugin in `child`, or None if `child` is not a plugin package."""
    if not child.is_dir() or child.name.startswith((".", "_")):
        return None
    if not (child / "__init__.py").is_file():
        return None
    try:
        check_plugin_name(child.name, "directory name")
        manifest = _read_manifest(child)
        if manifest.name != child.name:
            raise ManifestError(
                "name", f"{manifest.name!r} differs from the directory name {child.name!r}"
            )
    except NekoError as exc:
        return PluginCandidate(
            child.name, PluginSource.USER, child.name, None, child, False, str(exc)
        )
    return PluginCandidate(child.name, PluginSource.USER, child.name, manifest, child)


def shadows_module(name: str) -> bool:
    """True if `name` is a standard-library or otherwise importable top-level module."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return True
    for finder in sys.meta_path:
        if isinstance(finder, PluginFinder):
            continue
        find = getattr(finder, "find_spec", None)
        if find is not None and find(name, None) is not None:
            return True
    return False


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles from source every time: no `.pyc` read or written."""

    def get_code(self, fullname: str) -> CodeType:
        path = self.get_filename(fullname)
        return compile(self.get_data(path), path, "exec", dont_inherit=True)


class PluginFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of one kernel's directory plugins, by plugin name."""

    def __init__(self) -> None:
        self.roots: dict[str, Path] = {}

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        top, _, rest = fullname.partition(".")
        root = self.roots.get(top)
        if root is None:
            return None
        base = root.joinpath(*rest.split(".")) if rest else root
        init = base / "__init__.py"
        if init.is_file():
            file, search = init, [str(base)]
        elif rest and base.with_suffix(".py").is_file():
            file, search = base.with_suffix(".py"), None
        else:
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            file,
            loader=_FreshSourceLoader(fullname, str(file)),
            submodule_search_locations=search,
        )


def _owned(module_name: str, prefix: str) -> bool:
    return module_name == prefix or module_name.startswith(prefix + ".")


@attrs.define
class ImportedGeneration:
    """A freshly imported plugin module, and the modules it displaced from sys.modules."""

    module: ModuleType
    prefix: str
    displaced: dict[str, ModuleType]
    fresh: bool

    def rollback(self) -> None:
        """Forget the new modules and put the displaced ones back."""
        if self.fresh:
            purge_modules(self.prefix)
            sys.modules.update(self.displaced)
        self.displaced = {}

    def commit(self) -> None:
        """Let go of the displaced modules."""
        self.displaced = {}


def purge_modules(prefix: str) -> dict[str, ModuleType]:
    """Remove `prefix` and its submodules from sys.modules; return what was removed."""
    removed = {n: m for n, m in list(sys.modules.items()) if _owned(n, prefix)}
    for name in removed:
        del sys.modules[name]
    return removed


class ModuleLoader:
    """Imports plugin modules for one kernel; imports are serialized by a lock."""

    def __init__(self) -> None:
        self.finder = PluginFinder()
        self._lock = threading.Lock()

    def install(self) -> None:
        """Put the finder first on sys.meta_path."""
        if self.finder not in sys.meta_path:
            sys.meta_path.insert(0, self.finder)

    def uninstall(self) -> None:
        """Take the finder off sys.meta_path."""
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)

    def import_plugin(self, candidate: PluginCandidate, *, fresh: bool) -> ImportedGeneration:
        """Import the candidate's module (blocking: call it from a worker thread).

        Builtins are imported once and never re-imported: their code changes only by a
        restart. Others are imported as new module objects when `fresh` (a reload).
        """
        with self._lock:
            if candidate.source is PluginSource.BUILTIN:
                return ImportedGeneration(
                    importlib.import_module(candidate.module), candidate.module, {}, False
                )
            if candidate.source is PluginSource.USER:
                assert candidate.path is not None
                self.finder.roots[candidate.name] = candidate.path
            displaced = purge_modules(candidate.module) if fresh else {}
            importlib.invalidate_caches()
            try:
                module = importlib.import_module(candidate.module)
            except BaseException:
                purge_modules(candidate.module)
                sys.modules.update(displaced)
                raise
            return ImportedGeneration(module, candidate.module, displaced, True)

    def forget(self, candidate: PluginCandidate) -> None:
        """Drop a plugin's modules (it was disabled or deleted); builtins stay imported."""
        if candidate.source is PluginSource.BUILTIN:
            return
        with self._lock:
            purge_modules(candidate.module)
            if candidate.source is PluginSource.USER:
                self.finder.roots.pop(candidate.name, None)
