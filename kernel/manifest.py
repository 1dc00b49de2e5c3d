"""Plugin manifests (`plugin.toml`): parsing and validation that names the bad field."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from kernel.errors import ManifestError
from kernel.models import PluginManifest
from kernel.version import __version__

MANIFEST_FILE = "plugin.toml"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_FIELDS = {
    "name",
    "version",
    "description",
    "author",
    "nekobot",
    "dependencies",
    "config_schema",
    "homepage",
}


def check_plugin_name(name: object, field: str = "name") -> str:
    """Return `name` if it can name a plugin (a module and a storage namespace)."""
    # fullmatch: `$` would also match before a final newline ("name\n").
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ManifestError(
            field,
            f"{name!r} is not a valid plugin name "
            "(lowercase letters, digits and '_', starting with a letter)",
        )
    if "__" in name or name.endswith("_"):
        raise ManifestError(field, f"{name!r} must not contain '__' or end with '_'")
    return name


def _string(data: Mapping[str, Any], field: str, required: bool = False) -> str:
    value = data.get(field)
    if value is None:
        if required:
            raise ManifestError(field, "is required")
        return ""
    if not isinstance(value, str):
        raise ManifestError(field, f"must be a string, not {type(value).__name__}")
    return value


def parse_manifest(data: Mapping[str, Any]) -> PluginManifest:
    """Validate a manifest's data; the error names the first bad field."""
    for key in data:
        if key not in _FIELDS:
            raise ManifestError(key, "is not a known manifest field")
    name = check_plugin_name(_string(data, "name", required=True))
    version = _string(data, "version", required=True)
    try:
        Version(version)
    except InvalidVersion:
        raise ManifestError("version", f"{version!r} is not a PEP 440 version") from None
    nekobot = _string(data, "nekobot")
    if nekobot:
        try:
            SpecifierSet(nekobot)
        except InvalidSpecifier:
            raise ManifestError("nekobot", f"{nekobot!r} is not a version specifier") from None
    deps = data.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ManifestError("dependencies", "must be a list of requirement strings")
    for dep in deps:
        try:
            Requirement(dep)
        except InvalidRequirement:
            raise ManifestError("dependencies", f"{dep!r} is not a PEP 508 requirement") from None
    schema = data.get("config_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise ManifestError("config_schema", "must be a table (a JSON Schema object)")
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ManifestError("config_schema", f"invalid JSON Schema: {exc.message}") from None
    return PluginManifest(
        name=name,
        version=version,
        description=_string(data, "description"),
        author=_string(data, "author"),
        nekobot=nekobot,
        dependencies=tuple(deps),
        config_schema=schema,
        homepage=_string(data, "homepage"),
    )


def load_manifest(text: str) -> PluginManifest:
    """Parse the text of a `plugin.toml`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(MANIFEST_FILE, f"is not valid TOML: {exc}") from None
    return parse_manifest(data)


def check_compatible(manifest: PluginManifest) -> None:
    """Raise ManifestError if the plugin does not support this NekoBot version."""
    if manifest.nekobot and Version(__version__) not in SpecifierSet(manifest.nekobot):
        raise ManifestError(
            "nekobot", f"plugin supports NekoBot {manifest.nekobot}, this is {__version__}"
        )
