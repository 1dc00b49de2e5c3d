"""Test helpers that write plugins to disk: directory plugins and installed distributions.

    plugin_dir = tmp_path / "plugins"
    write_plugin(plugin_dir, "zz_echo", ECHO_CODE, manifest={"description": "echo"})

Plugin modules are process-global (`sys.modules`), so every test file should use
plugin names of its own; `purge_modules` drops leftovers of a name.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    """`value` as a TOML value (strings, numbers, booleans, lists and inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        inner = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def manifest_text(name: str, extras: Mapping[str, Any] | None = None) -> str:
    """The text of a `plugin.toml` for `name` (version 1.0 unless `extras` says otherwise)."""
    data: dict[str, Any] = {"name": name, "version": "1.0", **(extras or {})}
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in data.items())


def write_plugin(
    root: Path,
    name: str,
    code: str = "",
    *,
    manifest: Mapping[str, Any] | None = None,
    raw_manifest: str | None = None,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write the directory plugin `root/name` and return its directory.

    `code` (dedented) becomes `__init__.py`; `manifest` adds or overrides manifest
    fields, `raw_manifest` replaces the manifest text entirely; `files` maps relative
    paths to extra (dedented) file contents, e.g. a submodule. Rewriting an existing
    plugin overwrites the files given.
    """
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "__init__.py").write_text(textwrap.dedent(code), encoding="utf-8")
    text = raw_manifest if raw_manifest is not None else manifest_text(name, manifest)
    (directory / "plugin.toml").write_text(text, encoding="utf-8")
    for rel, content in (files or {}).items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content), encoding="utf-8")
    return directory


def write_distribution(
    site: Path,
    dist: str,
    name: str,
    code: str = "",
    *,
    module: str | None = None,
    manifest: Mapping[str, Any] | None = None,
    with_manifest: bool = True,
) -> Path:
    """Write a fake installed distribution that declares the plugin `name`; return its package.

    `site` must be put on `sys.path` (e.g. `monkeypatch.syspath_prepend`) for
    `importlib.metadata` to find `<dist>-1.0.dist-info` with its `nekobot.plugins`
    entry point, which points at the package `module` (default: `name`).
    """
    module = module or name
    package = site / module
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(textwrap.dedent(code), encoding="utf-8")
    if with_manifest:
        (package / "plugin.toml").write_text(manifest_text(name, manifest), encoding="utf-8")
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\nSummary: test plugin {name}\n",
        encoding="utf-8",
    )
    (info / "entry_points.txt").write_text(
        f"[nekobot.plugins]\n{name} = {module}\n", encoding="utf-8"
    )
    return package


def purge_modules(name: str) -> None:
    """Forget the module `name` and its submodules (leftovers of an earlier test)."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
