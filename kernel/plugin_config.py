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
        error = first_error(Draft202012Validator(schema), full)
        if error is not None:
            path, message = error
            raise ConfigError(path or "config", message)
    return full


def first_error(validator: Draft202012Validator, instance: Any) -> tuple[str, str] | None:
    """The first error of `instance` (by path) as `(dotted path, message)`, or None.

    The path of an unknown property names the property itself, not the object that
    holds it; the path of an error about the whole instance is "".
    """
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    first = errors[0]
    path = [str(p) for p in first.absolute_path]
    if first.validator == "additionalProperties" and isinstance(first.instance, Mapping):
        schema = first.schema if isinstance(first.schema, Mapping) else {}
        known = schema.get("properties", {})
        extra = sorted(str(k) for k in first.instance if k not in known)
        path += extra[:1]
    return ".".join(path), first.message
