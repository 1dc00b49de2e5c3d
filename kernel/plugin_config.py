"""A plugin's configuration: defaults from its JSON Schema, validation naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

from kernel.errors import ConfigError


def with_defaults(schema: Mapping[str, Any] | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with the top-level `default`s of `schema` filled in."""
    out: dict[str, Any] = {}
    if schema:
        for key, prop in dict(schema.get("properties", {})).items():
            if isinstance(prop, Mapping) and "default" in prop:
                out[key] = prop["default"]
    out.update(config)
    return out


def validate_config(schema: Mapping[str, Any] | None, config: Any) -> dict[str, Any]:
    """Return `config` with defaults if it satisfies `schema`; else ConfigError naming the field."""
    if not isinstance(config, Mapping):
        raise ConfigError("config", "must be a JSON object")
    full = with_defaults(schema, config)
    if schema:
        errors = sorted(
            Draft202012Validator(schema).iter_errors(full), key=lambda e: list(e.absolute_path)
        )
        if errors:
            first = errors[0]
            path = [str(p) for p in first.absolute_path]
            if first.validator == "additionalProperties" and isinstance(first.instance, Mapping):
                # Name the unknown property itself, not the object that holds it.
                schema_ = first.schema if isinstance(first.schema, Mapping) else {}
                known = schema_.get("properties", {})
                extra = sorted(str(k) for k in first.instance if k not in known)
                path += extra[:1]
            raise ConfigError(".".join(path) or "config", first.message)
    return full
