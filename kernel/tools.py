"""Tools a plugin offers the model: definitions, specs and the tool registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class ToolDefinition:
    """What the model is told about a tool: its name, what it does, its parameters' JSON Schema."""

    name: str
    description: str
    parameters: Mapping[str, Any] = attrs.field(factory=dict)
