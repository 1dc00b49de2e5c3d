"""A plugin's configuration: defaults from its JSON Schema, validation naming the field.

A validation error names the field and the rule it breaks, never the value: the value may
be a secret (an API key the admin API swapped back in for its masked form), and an error
about the whole object would otherwise print the whole configuration, secrets included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator, ValidationError

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
    """Return `config` with defaults if it satisfies `schema`; else ConfigError naming the
    field and the rule broken (never a value of the configuration)."""
    if not isinstance(config, Mapping):
        raise ConfigError("config", "must be a JSON object")
    full = with_defaults(schema, config)
    if schema:
        errors = sorted(
            Draft202012Validator(schema).iter_errors(full), key=lambda e: list(e.absolute_path)
        )
        if errors:
            field, rule = describe_error(errors[0])
            raise ConfigError(field or "config", rule)
    return full


def describe_error(error: ValidationError) -> tuple[str, str]:
    """(dotted field path, the rule it breaks) of a validation error, from the schema's
    side only: `error.message` quotes the offending value, which is not repeated here.
    Property names are keys, not values, so an unknown or missing one is named."""
    path = [str(p) for p in error.absolute_path]
    instance = error.instance
    keys = [str(k) for k in instance] if isinstance(instance, Mapping) else []
    if error.validator == "additionalProperties":
        # Name the unknown property itself, not the object that holds it.
        known = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
        extra = sorted(k for k in keys if k not in known)
        return ".".join(path + extra[:1]), "is not a known field"
    if error.validator == "required" and isinstance(error.validator_value, list):
        missing = [str(k) for k in error.validator_value if str(k) not in keys]
        return ".".join(path + missing[:1]), "is required"
    if error.validator is None:  # a `false` schema allows nothing
        return ".".join(path), "is not allowed"
    return ".".join(path), _rule(str(error.validator), error.validator_value)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


#: Messages for the usual rules; `{}` is the rule's limit from the schema.
_RULES = {
    "const": "must be {}",
    "minimum": "must be at least {}",
    "maximum": "must be at most {}",
    "exclusiveMinimum": "must be greater than {}",
    "exclusiveMaximum": "must be less than {}",
    "multipleOf": "must be a multiple of {}",
    "minLength": "must have at least {} characters",
    "maxLength": "must have at most {} characters",
    "pattern": "must match the pattern {}",
    "format": "must be a valid {}",
    "minItems": "must have at least {} items",
    "maxItems": "must have at most {} items",
    "minProperties": "must have at least {} properties",
    "maxProperties": "must have at most {} properties",
    "contains": "must contain an item matching the schema",
    "uniqueItems": "must not repeat an item",
    "anyOf": "must match at least one of the allowed schemas",
    "oneOf": "must match exactly one of the allowed schemas",
    "not": "must not match the schema under `not`",
    "dependentRequired": "lacks a property that another one requires",
    "propertyNames": "has a property name that is not allowed",
}


def _rule(validator: str, limit: Any) -> str:
    if validator == "type":
        kinds = limit if isinstance(limit, list) else [limit]
        return "must be of type " + " or ".join(str(k) for k in kinds)
    if validator == "enum" and isinstance(limit, list):
        return "must be one of " + ", ".join(_json(v) for v in limit)
    template = _RULES.get(validator)
    if template is not None:
        return template.format(_json(limit))
    return f"breaks the schema's {validator!r} rule"
