"""Tools a plugin offers the model: definitions, specs and the tool registry."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
import attrs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

from kernel.errors import ContributionError, NekoError
from kernel.lifecycle import Gate, GateCall, GateClosedError
from kernel.plugin_config import with_defaults
from kernel.registry import drop_claims, elect, replace_claims

if TYPE_CHECKING:
    from kernel.context import PluginContext


@attrs.frozen
class ToolDefinition:
    """What the model is told about a tool: its name, what it does, its parameters' JSON Schema."""

    name: str
    description: str
    parameters: Mapping[str, Any] = attrs.field(factory=dict)


#: What model APIs accept as a tool (function) name.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Between the plugin and the tool in a qualified name (model names allow no ':').
QUALIFIER = "__"
_MAX_RETRIES = 5


class ToolError(NekoError):
    """Raised by a tool handler to tell the model what went wrong (the message is shown
    to the model as the tool's error result; any other exception is only logged)."""


@attrs.frozen
class ToolInvocation:
    """What a tool handler receives."""

    #: The tool's own name (also when the model called it by its qualified name).
    name: str
    #: The arguments, validated against the tool's parameters (their defaults filled in).
    arguments: Mapping[str, Any]
    ctx: PluginContext
    #: The name the model used.
    called_as: str
    #: The model's id of this call, if it gave one.
    call_id: str = ""


ToolHandler = Callable[[ToolInvocation], Awaitable[Any]]


def _empty_object() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


@attrs.frozen
class ToolSpec:
    """A tool a plugin offers the model through `nekobot_llm_tools`.

    The handler returns a str (given to the model as it is) or a JSON-serialisable
    value (given as JSON); it raises ToolError to report a failure to the model.
    """

    name: str
    handler: ToolHandler = attrs.field(repr=False)
    description: str = ""
    #: A JSON Schema of type "object": the tool's named arguments.
    parameters: Mapping[str, Any] = attrs.field(factory=_empty_object)
    #: Seconds a call may take; None: the kernel's `handler_timeout`.
    timeout: float | None = None

    @property
    def definition(self) -> ToolDefinition:
        """The tool as the model is told about it (under its own name)."""
        return ToolDefinition(self.name, self.description, self.parameters)


@attrs.frozen
class ToolEntry:
    """A registered tool."""

    owner: str
    spec: ToolSpec
    validator: Draft202012Validator = attrs.field(eq=False, repr=False)
    generation: object = attrs.field(eq=False, repr=False, default=None)

    @property
    def name(self) -> str:
        """The tool's own name."""
        return self.spec.name

    @property
    def qualified(self) -> str:
        """`plugin__name`: always reachable."""
        return f"{self.owner}{QUALIFIER}{self.spec.name}"


@attrs.frozen
class ToolConflict:
    """Two or more plugins offer a tool of one name."""

    name: str
    #: The plugin whose tool answers the plain name.
    holder: str
    #: Every claimant in claim order, with the name its tool answers to.
    candidates: tuple[tuple[str, str], ...]


@attrs.frozen
class ToolOutcome:
    """The result of one tool call, as it goes back to the model."""

    #: The name the model used.
    name: str
    #: What the model is told: the result (str or JSON) or what went wrong.
    content: str
    is_error: bool = False
    #: What the handler returned (None on an error).
    value: Any = None
    call_id: str = ""

    @classmethod
    def error(cls, name: str, message: str, call_id: str = "") -> ToolOutcome:
        """An error result: what the model is told went wrong."""
        return cls(name, message, is_error=True, call_id=call_id)


def _serving(entry: ToolEntry) -> tuple[Gate, PluginContext | None]:
    """The gate and context of the generation that registered `entry`."""
    # A Generation (kernel.generations), which this module cannot import.
    generation: Any = entry.generation
    return cast(Gate, generation.gate), cast("PluginContext | None", generation.ctx)


def _validated(owner: str, spec: ToolSpec) -> Draft202012Validator:
    """Check one spec as a load does; return the validator of its arguments."""

    def bad(problem: str) -> ContributionError:
        return ContributionError(f"plugin {owner!r}: tool {spec.name!r}: {problem}")

    if not isinstance(spec.name, str) or not TOOL_NAME.fullmatch(spec.name):
        raise bad("a tool name is 1-64 letters, digits, '_' or '-' (what model APIs accept)")
    if QUALIFIER in spec.name:
        raise bad(f"{QUALIFIER!r} is reserved for qualified names (plugin{QUALIFIER}tool)")
    if len(owner) + len(QUALIFIER) + len(spec.name) > 64:
        raise bad(f"its qualified name {owner}{QUALIFIER}{spec.name} is longer than 64 characters")
    if not callable(spec.handler):
        raise bad("the handler is not callable")
    if spec.timeout is not None and not spec.timeout > 0:
        raise bad(f"timeout must be positive, not {spec.timeout!r}")
    schema = spec.parameters
    if not isinstance(schema, Mapping):
        raise bad(f"parameters must be a JSON Schema object, not {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise bad(f"parameters are not a valid JSON Schema: {exc.message}") from None
    if schema.get("type") != "object":
        raise bad('parameters must be a schema of type "object" (the named arguments)')
    return Draft202012Validator(schema)


class ToolRegistry:
    """Every tool of every active plugin; a contested name keeps its holder.

    A name may be offered by several plugins. Exactly one of them holds it; the others
    are reachable as `plugin__name`. The holder is, in order: the recorded holder
    (persisted, so it survives reloads and restarts), the current holder, the earliest
    claim. Registration never overwrites; a clash is logged and listed (`conflicts`).
    """

    def __init__(
        self,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        timeout: float,
        settled: Callable[[str], Awaitable[None]],
    ) -> None:
        self._log = log
        self._timeout = timeout
        #: Waits until no operation runs on a plugin (a call retried after a reload).
        self._settled = settled
        self._claims: dict[str, list[ToolEntry]] = {}
        self._holders: dict[str, ToolEntry] = {}
        self._qualified: dict[str, ToolEntry] = {}
        self._by_owner: dict[str, list[ToolEntry]] = {}
        #: name -> plugin that held a contested name (persisted).
        self.records: dict[str, str] = {}
        self.version = 0

    # -- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(es) for es in self._by_owner.values())

    def lookup(self, name: str) -> ToolEntry | None:
        """The tool that answers `name` (its plain name or `plugin__name`), if any."""
        return self._holders.get(name) or self._qualified.get(name)

    def entries(self) -> list[ToolEntry]:
        """Every registered tool, ordered by qualified name."""
        return sorted((e for es in self._by_owner.values() for e in es), key=lambda e: e.qualified)

    def owned_by(self, owner: str) -> list[ToolEntry]:
        """The tools of one plugin."""
        return list(self._by_owner.get(owner, ()))

    def name_of(self, entry: ToolEntry) -> str:
        """The name the model calls `entry` by: its own if it holds it, else qualified."""
        holder = self._holders.get(entry.name)
        return entry.name if holder is not None and holder.owner == entry.owner else entry.qualified

    def definitions(self) -> list[ToolDefinition]:
        """Every tool as the model is told about it, each once, ordered by name."""
        out = [attrs.evolve(e.spec.definition, name=self.name_of(e)) for e in self.entries()]
        return sorted(out, key=lambda d: d.name)

    def conflicts(self) -> list[ToolConflict]:
        """Every name more than one plugin offers."""
        return [
            ToolConflict(
                name,
                self._holders[name].owner,
                tuple((c.owner, self.name_of(c)) for c in claims),
            )
            for name, claims in sorted(self._claims.items())
            if len(claims) > 1
        ]

    # -- as the registry of the `tools` contribution kind ------------------------------

    def check(self, owner: str, specs: Sequence[ToolSpec], *, replacing: bool = False) -> None:
        """Validate a plugin's tools (ContributionError naming the tool and the problem).

        A name another plugin holds is no error: tool names are contested.
        """
        self._prepare(owner, specs)

    def clashes(self, owner: str, specs: Sequence[ToolSpec]) -> list[tuple[str, str]]:
        """The names of `specs` another plugin holds now, as `(name, holder)`."""
        out = []
        for entry in self._prepare(owner, specs):
            holder = self._holders.get(entry.name)
            if holder is not None and holder.owner != owner:
                out.append((entry.name, holder.owner))
        return out

    def commit(
        self,
        owner: str,
        specs: Sequence[ToolSpec],
        generation: object = None,
        *,
        replacing: bool,
    ) -> None:
        """Register a generation's tools; the owner keeps its place in every claim it had."""
        entries = self._prepare(owner, specs, generation)
        affected, released = replace_claims(self._claims, owner, {e.name: e for e in entries})
        for name in released:
            self._forget_record(name, owner)
        self._drop_qualified(owner)
        self._qualified.update((e.qualified, e) for e in entries)
        self._by_owner[owner] = entries
        self._elect_all(affected)
        for entry in entries:
            self._warn_clash(entry.name)

    def drop_owner(self, owner: str, *, transfer: bool = True) -> int:
        """Withdraw a plugin's tools; the names it held pass to the next claimant.

        With `transfer=False` (shutdown, a failed restore) the holder records are kept,
        so the plugin holds its names again when it comes back.
        """
        entries = self._by_owner.pop(owner, None)
        if entries is None:
            return 0
        affected = drop_claims(self._claims, owner)
        if transfer:
            for name in affected:
                self._forget_record(name, owner)
        self._drop_qualified(owner)
        self._elect_all(affected, record=transfer)
        return len(entries)

    def export_state(self) -> Mapping[str, Any]:
        """What must survive a restart: who holds each contested name."""
        return {"records": dict(self.records)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `export_state` returned (before any plugin registers)."""
        self.records = dict(state.get("records", {}))

    def _prepare(
        self, owner: str, specs: Iterable[ToolSpec], generation: object = None
    ) -> list[ToolEntry]:
        entries: list[ToolEntry] = []
        seen: set[str] = set()
        for spec in specs:
            validator = _validated(owner, spec)
            if spec.name in seen:
                raise ContributionError(f"plugin {owner!r} declares tool {spec.name!r} twice")
            seen.add(spec.name)
            entries.append(ToolEntry(owner, spec, validator, generation))
        return entries

    def _forget_record(self, name: str, owner: str) -> None:
        if self.records.get(name) == owner:
            del self.records[name]

    def _drop_qualified(self, owner: str) -> None:
        for q in [q for q, e in self._qualified.items() if e.owner == owner]:
            del self._qualified[q]

    def _elect_all(self, names: Iterable[str], *, record: bool = True) -> None:
        for name in names:
            claims = self._claims.get(name)
            if not claims:
                self._holders.pop(name, None)
                continue
            current = self._holders.get(name)
            choice = elect(claims, self.records.get(name), current.owner if current else None)
            if len(claims) > 1 and record:
                self.records[name] = choice.owner
            self._holders[name] = choice
        self.version += 1

    def _warn_clash(self, name: str) -> None:
        claims = self._claims.get(name, ())
        if len(claims) < 2:
            return
        holder = self._holders[name]
        others = [c for c in claims if c is not holder]
        self._log.warning(
            "tool %r is offered by plugins %s; %r keeps the name, the others are %s",
            name,
            ", ".join(repr(c.owner) for c in claims),
            holder.owner,
            ", ".join(repr(c.qualified) for c in others),
        )

    # -- calling -----------------------------------------------------------------------

    async def call(
        self, name: str, arguments: Mapping[str, Any] | str | None = None, *, call_id: str = ""
    ) -> ToolOutcome:
        """Call the tool the model named with its arguments (a mapping, or the JSON text
        model APIs send), validated against the tool's parameters.

        Never raises for the caller's or the tool's faults: an unknown tool, bad
        arguments, a handler that raised or timed out come back as an error outcome. The
        call runs inside its plugin's gate, under the tool's time bound (else the
        kernel's); a call that arrives while the plugin reloads waits for the new one.
        """

        def failure(message: str) -> ToolOutcome:
            return ToolOutcome.error(name, message, call_id)

        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                return failure(f"the arguments of tool {name!r} are not valid JSON: {exc}")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, Mapping):
            return failure(f"the arguments of tool {name!r} must be a JSON object")
        entry: ToolEntry | None = None
        for _ in range(_MAX_RETRIES):
            entry = self.lookup(name)
            if entry is None:
                return failure(f"there is no tool {name!r}")
            gate, ctx = _serving(entry)
            try:
                call = gate.enter(f"tool {entry.qualified!r}")
            except GateClosedError:
                await self._settled(entry.owner)
                continue
            try:
                return await self._run(entry, ctx, call, name, arguments, call_id)
            finally:
                gate.leave(call)
        self._log.error(
            "tool %r: plugin %r kept changing; call dropped", name, entry and entry.owner
        )
        return failure(f"tool {name!r} is unavailable right now")

    async def _run(
        self,
        entry: ToolEntry,
        ctx: PluginContext | None,
        call: GateCall,
        name: str,
        arguments: Mapping[str, Any],
        call_id: str,
    ) -> ToolOutcome:
        def failure(message: str) -> ToolOutcome:
            return ToolOutcome.error(name, message, call_id)

        spec = entry.spec
        assert ctx is not None  # an open gate: the generation has started
        error = best_match(entry.validator.iter_errors(arguments))
        if error is not None:
            path = ".".join(str(p) for p in error.absolute_path)
            where = f"argument {path!r}: " if path else ""
            return failure(f"invalid arguments for tool {name!r}: {where}{error.message}")
        invocation = ToolInvocation(
            spec.name, with_defaults(spec.parameters, arguments), ctx, name, call_id
        )
        timeout = spec.timeout or self._timeout
        # The call's scope is both the time bound and what the gate cancels if the
        # plugin is retired meanwhile (as for command handlers).
        scope = call.cancel_scope
        scope.deadline = anyio.current_time() + timeout
        try:
            with scope:
                value = await spec.handler(invocation)
        except ToolError as exc:
            return failure(exc.message)
        except Exception as exc:
            ctx.log.error(
                "tool %r raised %s: %s", entry.qualified, type(exc).__name__, exc, exc_info=True
            )
            return failure(f"tool {name!r} failed ({type(exc).__name__})")
        if scope.cancelled_caught and call.cancelled:
            return failure(f"tool {name!r} was cancelled: its plugin went away")
        if scope.cancelled_caught:
            ctx.log.error("tool %r timed out after %.1fs", entry.qualified, timeout)
            return failure(f"tool {name!r} timed out after {timeout:g}s")
        if isinstance(value, str):
            content = value
        else:
            try:
                content = json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                ctx.log.error("tool %r returned a value that is not JSON: %s", entry.qualified, exc)
                return failure(f"tool {name!r} failed (its result is not JSON)")
        return ToolOutcome(name, content, value=value, call_id=call_id)
