"""Staging a plugin generation: import it, register its hookimpls, collect its contributions.

One path for both a load (`kernel.generations`, into the kernel's plugin manager) and an
upload's dry run (`kernel.install`, into a throwaway one), so that an upload is checked
exactly as enabling it would check it.
"""

from __future__ import annotations

from types import ModuleType

import pluggy

from kernel.calling import Contributions, check_hook_names, collect_contributions
from kernel.errors import NekoError, PluginError, PluginLoadError
from kernel.hookspecs import PROJECT, SPEC_MODULES
from kernel.loader import ImportedGeneration, ModuleLoader, PluginCandidate


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows every NekoBot hookspec."""
    pm = pluggy.PluginManager(PROJECT)
    for module in SPEC_MODULES:
        pm.add_hookspecs(module)
    return pm


def import_generation(loader: ModuleLoader, candidate: PluginCandidate) -> ImportedGeneration:
    """Import a fresh generation of `candidate` (blocking: call it from a worker thread);
    any failure of the plugin's code is a PluginLoadError."""
    try:
        return loader.import_plugin(candidate, fresh=True)
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() must not stop us
        raise PluginLoadError(
            candidate.name, f"import failed: {type(exc).__name__}: {exc}"
        ) from exc


def register_generation(
    pm: pluggy.PluginManager, module: ModuleType, pm_name: str, owner: str
) -> tuple[tuple[str, ...], Contributions]:
    """Register `module` in `pm` as `pm_name`; return its hook names and contributions.

    Its `nekobot_*` names must all be marked hookimpls of known hooks, and its contribution
    hooks must return valid specs; otherwise it is unregistered again and a
    PluginLoadError names the problem.
    """
    try:
        pm.register(module, name=pm_name)
    except Exception as exc:
        raise PluginLoadError(owner, f"invalid hook implementation: {exc}") from None
    try:
        plugin = pm.get_plugin(pm_name)
        hooks = tuple(sorted(c.name for c in pm.get_hookcallers(plugin) or []))
        check_hook_names(owner, module, hooks)
        contributions = collect_contributions(pm, pm_name, owner)
    except NekoError as exc:
        pm.unregister(name=pm_name)
        if isinstance(exc, PluginError):
            raise
        raise PluginLoadError(owner, exc.message) from None
    except BaseException:
        pm.unregister(name=pm_name)
        raise
    return hooks, contributions
