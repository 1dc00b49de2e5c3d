"""`validate_config`: errors name the field and the rule broken, never a value."""

from __future__ import annotations

from typing import Any

import pytest

from kernel import ConfigError
from kernel.plugin_config import validate_config

KEY = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "maxProperties": 3,
    "required": ["model"],
    "properties": {
        "api_key": {"type": "string", "writeOnly": True, "pattern": "^sk-", "minLength": 24},
        "model": {"enum": ["small", "large"]},
        "retries": {"type": ["integer", "null"], "maximum": 5},
        "headers": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 8}},
        "backup_keys": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "proxy": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^http://"}]},
    },
}


@pytest.mark.parametrize(
    ("config", "field", "rule"),
    [
        # A rule about the whole object: jsonschema's message prints the whole object.
        ({"api_key": KEY, "model": "small", "retries": 1, "proxy": None}, "config", "at most 3"),
        ({"api_key": "xk" + KEY[2:], "model": "small"}, "api_key", 'pattern "^sk-"'),
        ({"api_key": KEY[:10], "model": "small"}, "api_key", "at least 24 characters"),
        ({"api_key": KEY}, "model", "is required"),
        ({"api_key": KEY, "model": KEY}, "model", 'one of "small", "large"'),
        ({"api_key": KEY, "model": "small", KEY: 1}, KEY, "is not a known field"),
        ({"model": "small", "retries": KEY}, "retries", "of type integer or null"),
        ({"model": "small", "headers": {"Authorization": KEY}}, "headers.Authorization", "at most"),
        ({"model": "small", "backup_keys": [KEY, KEY]}, "backup_keys", "not repeat"),
        ({"model": "small", "proxy": f"socks://user:{KEY}@h"}, "proxy", "at least one"),
        ({"model": "small", "api_key": {"nested": KEY}}, "api_key", "of type string"),
    ],
)
def test_errors_name_the_field_and_rule_but_no_value(
    config: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(SCHEMA, config)
    assert caught.value.field == field
    assert rule in caught.value.message
    # The field may be an unknown key (a key is named, it is not a value).
    assert KEY not in caught.value.message.removeprefix(f"{field}:")
    assert KEY[8:] not in caught.value.message.removeprefix(f"{field}:")


def test_a_valid_config_gets_its_defaults() -> None:
    schema = {"type": "object", "properties": {"model": {"type": "string", "default": "small"}}}
    assert validate_config(schema, {}) == {"model": "small"}
    with pytest.raises(ConfigError) as caught:
        validate_config(schema, [KEY])
    assert caught.value.field == "config" and KEY not in caught.value.message
