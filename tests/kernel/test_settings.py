"""Settings validation: what no schema can say (depth and size of free-form values)."""

from __future__ import annotations

from typing import Any

import pytest

from kernel.errors import ConfigError
from kernel.settings import MAX_DEPTH, MAX_ITEMS, SETTINGS_SCHEMA, Settings, merged


def nested(levels: int) -> Any:
    """`levels` arrays, one inside the other."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_deeply_nested_values_are_refused_naming_the_field() -> None:
    for levels in (MAX_DEPTH, 400, 5000):
        ui = {"x": nested(levels)}  # `ui` is level 1
        with pytest.raises(ConfigError) as caught:
            merged(Settings(), {"ui": ui}, SETTINGS_SCHEMA)
        assert caught.value.field == "ui"
        assert f"deeper than {MAX_DEPTH} levels" in caught.value.message


def test_values_within_the_bounds_are_kept() -> None:
    ui = {"x": nested(MAX_DEPTH - 1), "many": list(range(MAX_ITEMS - 100))}
    assert merged(Settings(), {"ui": ui}, SETTINGS_SCHEMA).ui == ui


def test_too_many_values_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        merged(Settings(), {"ui": {"many": list(range(MAX_ITEMS))}}, SETTINGS_SCHEMA)
    assert caught.value.field == "ui"
    assert f"more than {MAX_ITEMS} values" in caught.value.message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rate_limit_per_minute": "zz-sent-value"}, "rate_limit_per_minute"),
        ({"cors_origins": ["zz-sent-value"]}, "cors_origins.0"),
        ({"log_level": "zz-sent-value"}, "log_level"),
    ],
)
def test_errors_name_the_field_and_rule_never_the_value(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        merged(Settings(), changes, SETTINGS_SCHEMA)
    assert err.value.field == field
    assert "zz-sent-value" not in str(err.value)
