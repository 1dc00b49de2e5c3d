"""neko_tools: a unit converter offered to the model as a tool, and as a command."""

from kernel import CommandSpec, ToolError, ToolSpec, hookimpl

# How many of the dimension's base unit (metre, kilogram) one unit is.
FACTORS = {
    "length": {"m": 1.0, "km": 1000.0, "cm": 0.01, "mi": 1609.344, "ft": 0.3048, "in": 0.0254},
    "mass": {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125},
}
TEMPERATURES = ("C", "F", "K")
UNITS = sorted({u for factors in FACTORS.values() for u in factors} | set(TEMPERATURES))

PARAMETERS = {
    "type": "object",
    "properties": {
        "value": {"type": "number", "description": "The quantity to convert."},
        "from": {"type": "string", "enum": UNITS, "description": "Its unit."},
        "to": {"type": "string", "enum": UNITS, "description": "The unit wanted."},
        "digits": {"type": "integer", "minimum": 0, "maximum": 10, "default": 3},
    },
    "required": ["value", "from", "to"],
    "additionalProperties": False,
}


def to_kelvin(value: float, unit: str) -> float:
    return {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[unit]


def from_kelvin(kelvin: float, unit: str) -> float:
    return {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[unit]


def convert(value: float, source: str, target: str) -> float:
    """`value` in `source` units, in `target` units; ToolError if they do not match."""
    for unit in (source, target):
        if unit not in UNITS:
            raise ToolError(f"unknown unit {unit!r}")
    if source in TEMPERATURES and target in TEMPERATURES:
        kelvin = to_kelvin(value, source)
        if kelvin < 0:
            raise ToolError(f"{value:g} {source} is below absolute zero")
        return from_kelvin(kelvin, target)
    for factors in FACTORS.values():
        if source in factors and target in factors:
            return value * factors[source] / factors[target]
    raise ToolError(f"cannot convert {source} to {target}: they measure different things")


async def convert_units(call):
    """The tool: the arguments are already checked against PARAMETERS."""
    args = call.arguments
    result = convert(args["value"], args["from"], args["to"])
    return {"value": round(result, args["digits"]), "unit": args["to"]}


async def convert_command(cmd):
    """`/convert 10 km mi`: the same conversion, for people."""
    try:
        value, source, target = float(cmd.argv[0]), cmd.argv[1], cmd.argv[2]
        result = convert(value, source, target)
    except (IndexError, ValueError):
        return "Usage: /convert VALUE FROM TO (units: " + ", ".join(UNITS) + ")"
    except ToolError as exc:
        return f"Sorry, {exc.message}."
    return f"{value:g} {source} = {round(result, 3):g} {target}"


@hookimpl
def nekobot_llm_tools():
    return [
        ToolSpec(
            "convert_units",
            convert_units,
            "Convert a length, mass or temperature from one unit to another.",
            parameters=PARAMETERS,
        )
    ]


@hookimpl
def nekobot_commands():
    return [CommandSpec("convert", convert_command, usage="/convert VALUE FROM TO")]
