"""The command registry: names and aliases per plugin, contested names, and parsing.

A key (a name or an alias, case-folded) may be claimed by several plugins. Exactly
one of them holds it; the others stay reachable as `plugin:name`. The holder is
chosen by, in order: the admin's resolution, the recorded holder (persisted, so it
survives reloads and restarts), the earliest claim. Registration never overwrites.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from kernel.errors import CommandNotFoundError, ContributionError, NekoError
from kernel.models import CommandConflict, CommandSpec
from kernel.registry import drop_claims, elect, replace_claims

_KEY_RE = re.compile(r"[^\s:/]{1,64}")
# Characters on which shlex.split and str.split could disagree (quotes, escapes, and the
# ASCII whitespace str.split knows but shlex does not).
_SHLEX_SPECIAL = re.compile(r"[\"'\\\x0b\x0c\x1c-\x1f]")


def normalize_key(name: str) -> str:
    """Case-fold a command name or alias; raise ValueError if it cannot be a key."""
    key = name.strip().casefold()
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid command name {name!r} (no spaces, ':' or '/'; 1-64 chars)")
    return key


@attrs.frozen
class CommandEntry:
    """A registered command."""

    owner: str
    spec: CommandSpec
    keys: tuple[str, ...]
    generation: object = attrs.field(eq=False, repr=False, default=None)

    @property
    def name(self) -> str:
        """The normalised command name."""
        return self.keys[0]

    @property
    def qualified(self) -> str:
        """`plugin:name`, always reachable."""
        return f"{self.owner}:{self.keys[0]}"


@attrs.frozen
class ParsedCommand:
    """A message split into prefix, command name and arguments."""

    prefix: str
    name: str
    args: str

    @property
    def argv(self) -> tuple[str, ...]:
        """The arguments split shell-style (plain whitespace split if quotes are unbalanced)."""
        args = self.args
        if args.isascii() and not _SHLEX_SPECIAL.search(args):
            return tuple(args.split())  # same result as shlex.split, without its tokenizer
        try:
            return tuple(shlex.split(args))
        except ValueError:
            return tuple(self.args.split())


def parse_command(text: str, prefixes: Sequence[str]) -> ParsedCommand | None:
    """Split `text` if it starts with one of `prefixes` (longest first)."""
    stripped = text.lstrip()
    for prefix in sorted(prefixes, key=len, reverse=True):
        if stripped.startswith(prefix):
            rest = stripped[len(prefix) :]
            if not rest or rest[0].isspace():
                continue
            name, _, args = rest.partition(" ")
            if "\n" in name:
                name, _, more = name.partition("\n")
                args = more + (" " + args if args else "")
            return ParsedCommand(prefix, name, args.strip())
    return None


Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


class CommandRegistry:
    """Every command of every active plugin, with conflict detection.

    A clash (a key that a plugin claims while another claims it too) is logged as a
    warning when it begins; a reload that claims the same keys again logs nothing.
    """

    def __init__(self, log: Log | None = None) -> None:
        self.log: Log = log if log is not None else logging.getLogger("nekobot.kernel")
        self._claims: dict[str, list[CommandEntry]] = {}
        self._holders: dict[str, CommandEntry] = {}
        self._qualified: dict[str, CommandEntry] = {}
        self._by_owner: dict[str, list[CommandEntry]] = {}
        #: key -> plugin that held a contested key (persisted).
        self.records: dict[str, str] = {}
        #: key -> plugin an admin chose (persisted).
        self.resolutions: dict[str, str] = {}
        #: extra key -> `plugin:name` an admin added (persisted).
        self.admin_aliases: dict[str, str] = {}
        self.version = 0

    # -- reading ---------------------------------------------------------------------

    def lookup(self, name: str) -> CommandEntry | None:
        """The command that answers `name` (a key or `plugin:key`), if any."""
        entry = self._holders.get(name)
        if entry is not None:
            return entry
        key = name.casefold()
        if ":" in key:
            return self._qualified.get(key)
        return self._holders.get(key)

    def entries(self) -> list[CommandEntry]:
        """Every registered command, ordered by qualified name."""
        return sorted((e for es in self._by_owner.values() for e in es), key=lambda e: e.qualified)

    def owned_by(self, owner: str) -> list[CommandEntry]:
        """The commands of one plugin."""
        return list(self._by_owner.get(owner, ()))

    def holds(self, entry: CommandEntry) -> bool:
        """True if `entry` currently answers its own name."""
        holder = self._holders.get(entry.name)
        return holder is not None and holder.owner == entry.owner

    def holder_of(self, key: str) -> str | None:
        """The plugin that holds `key`, if any."""
        entry = self._holders.get(key.casefold())
        return entry.owner if entry else None

    def conflicts(self) -> list[CommandConflict]:
        """Every contested key."""
        return [self._conflict(k) for k in sorted(self._claims) if len(self._claims[k]) > 1]

    def _conflict(self, key: str) -> CommandConflict:
        claims = self._claims[key]
        return CommandConflict(
            key=key,
            candidates=tuple((c.owner, f"{c.owner}:{c.name}") for c in claims),
            holder=self._holders[key].owner,
            resolution=self.resolutions.get(key),
        )

    def __len__(self) -> int:
        return sum(len(es) for es in self._by_owner.values())

    # -- preparing -------------------------------------------------------------------

    def prepare(
        self, owner: str, specs: Iterable[CommandSpec], generation: object = None
    ) -> list[CommandEntry]:
        """Validate one plugin's commands; a key declared twice in it is a ContributionError."""
        entries: list[CommandEntry] = []
        seen: dict[str, str] = {}
        for spec in specs:
            if not isinstance(spec, CommandSpec):
                raise ContributionError(
                    f"plugin {owner!r}: nekobot_commands must yield CommandSpec, "
                    f"not {type(spec).__name__}"
                )
            try:
                keys = [normalize_key(spec.name), *(normalize_key(a) for a in spec.aliases)]
            except ValueError as exc:
                raise ContributionError(f"plugin {owner!r}: {exc}") from None
            for key in keys:
                if key in seen:
                    raise ContributionError(
                        f"plugin {owner!r} declares command key {key!r} twice "
                        f"(in {seen[key]!r} and {spec.name!r})"
                    )
                seen[key] = spec.name
            entries.append(CommandEntry(owner, spec, tuple(keys), generation))
        return entries

    def preview(self, owner: str, entries: Iterable[CommandEntry]) -> list[CommandConflict]:
        """The conflicts that registering `entries` (replacing `owner`'s) would leave."""
        out = []
        for entry in entries:
            for key in self._claim_keys(entry):
                others = [c for c in self._claims.get(key, ()) if c.owner != owner]
                if others:
                    holder = self.resolutions.get(key) or others[0].owner
                    if self.resolutions.get(key) != owner and self.records.get(key) == owner:
                        holder = owner
                    cands = [(c.owner, f"{c.owner}:{c.name}") for c in others]
                    cands.append((owner, entry.qualified))
                    out.append(
                        CommandConflict(key, tuple(cands), holder, self.resolutions.get(key))
                    )
        return out

    def _claim_keys(self, entry: CommandEntry) -> list[str]:
        keys = list(entry.keys)
        keys.extend(
            a for a, q in self.admin_aliases.items() if q == entry.qualified and a not in keys
        )
        return keys

    # -- as the registry of the `commands` contribution kind -------------------------

    def check(self, owner: str, specs: Sequence[CommandSpec], *, replacing: bool = False) -> None:
        """Validate a plugin's commands (a key declared twice is a ContributionError).

        A key another plugin holds is no error: command names are contested.
        """
        self.prepare(owner, specs)

    def clashes(self, owner: str, specs: Sequence[CommandSpec]) -> list[tuple[str, str]]:
        """The keys of `specs` another plugin holds now, as `(key, holder)`."""
        out = []
        for entry in self.prepare(owner, specs):
            for key in entry.keys:
                holder = self._holders.get(key)
                if holder is not None and holder.owner != owner:
                    out.append((key, holder.owner))
        return out

    def commit(
        self,
        owner: str,
        specs: Sequence[CommandSpec],
        generation: object = None,
        *,
        replacing: bool,
    ) -> None:
        """Register a generation's commands, replacing the owner's current ones if `replacing`."""
        entries = self.prepare(owner, specs, generation)
        if replacing:
            self.replace_owner(owner, entries)
        else:
            self.add(owner, entries)

    # -- writing ---------------------------------------------------------------------

    def add(self, owner: str, entries: Sequence[CommandEntry]) -> None:
        """Register a plugin's commands (which it must not have registered yet)."""
        if owner in self._by_owner:
            raise NekoError(f"plugin {owner!r} already has commands registered")
        before = self._claimants(k for e in entries for k in self._claim_keys(e))
        self._by_owner[owner] = list(entries)
        affected = set()
        for entry in entries:
            for key in self._claim_keys(entry):
                self._claims.setdefault(key, []).append(entry)
                affected.add(key)
            for key in entry.keys:
                self._qualified[f"{owner}:{key}"] = entry
        self._elect_all(affected)
        self._report_clashes(before)

    def replace_owner(self, owner: str, entries: Sequence[CommandEntry]) -> None:
        """Swap a plugin's commands for a new generation's, keeping its place in each claim."""
        new_by_key = {k: e for e in entries for k in self._claim_keys(e)}
        before = self._claimants(new_by_key)
        affected, released = replace_claims(self._claims, owner, new_by_key)
        for key in released:
            self._forget_record(key, owner)
        self._drop_qualified(owner)
        for entry in entries:
            for key in entry.keys:
                self._qualified[f"{owner}:{key}"] = entry
        self._by_owner[owner] = list(entries)
        self._elect_all(affected)
        self._report_clashes(before)

    def drop_owner(self, owner: str, *, transfer: bool = True) -> int:
        """Withdraw a plugin's commands; the names it held pass to the next claimant.

        With `transfer=False` (shutdown, a failed restore) the persisted holder records
        are kept, so the plugin holds its names again when it comes back.
        """
        entries = self._by_owner.pop(owner, None)
        if entries is None:
            return 0
        affected = drop_claims(self._claims, owner)
        if transfer:
            for key in affected:
                self._forget_record(key, owner)
        self._drop_qualified(owner)
        self._elect_all(affected, record=transfer)
        return len(entries)

    def _claimants(self, keys: Iterable[str]) -> dict[str, set[str]]:
        return {k: {c.owner for c in self._claims.get(k, ())} for k in keys}

    def _report_clashes(self, before: Mapping[str, set[str]]) -> None:
        """Warn of each key that a plugin now contests and did not contest before."""
        for key, owners in before.items():
            claims = self._claims.get(key, ())
            if len(claims) < 2 or not {c.owner for c in claims} - owners:
                continue
            holder = self._holders[key]
            others = [c for c in claims if c is not holder]
            self.log.warning(
                "command %r is claimed by plugins %s: %r holds it; %s stay%s reachable as %s "
                "(GET /api/commands/conflicts to choose)",
                key,
                _and(repr(c.owner) for c in claims),
                holder.owner,
                _and(repr(c.owner) for c in others),
                "s" if len(others) == 1 else "",
                _and(repr(c.qualified) for c in others),
            )

    def _forget_record(self, key: str, owner: str) -> None:
        if self.records.get(key) == owner:
            del self.records[key]

    def _drop_qualified(self, owner: str) -> None:
        prefix = f"{owner}:"
        for q in [q for q in self._qualified if q.startswith(prefix)]:
            del self._qualified[q]

    def _elect_all(self, keys: Iterable[str], *, record: bool = True) -> None:
        for key in keys:
            self._elect(key, record=record)
        self.version += 1

    def _elect(self, key: str, *, record: bool = True) -> None:
        claims = self._claims.get(key)
        if not claims:
            self._holders.pop(key, None)
            return
        current = self._holders.get(key)
        choice = elect(
            claims,
            self.resolutions.get(key),
            self.records.get(key),
            current.owner if current else None,
        )
        if len(claims) > 1 and record:
            self.records[key] = choice.owner
        self._holders[key] = choice

    # -- admin resolutions -------------------------------------------------------------

    def resolve(self, key: str, plugin: str) -> CommandConflict | None:
        """Make `plugin` hold `key` from now on (persist the registry state afterwards)."""
        key = normalize_key(key)
        owners = [c.owner for c in self._claims.get(key, ())]
        if plugin not in owners:
            raise CommandNotFoundError(f"plugin {plugin!r} does not claim command {key!r}")
        self.resolutions[key] = plugin
        self._elect_all([key])
        return self._conflict(key) if len(owners) > 1 else None

    def unresolve(self, key: str) -> None:
        """Drop the admin's choice for `key`; its current holder keeps it."""
        key = normalize_key(key)
        self.resolutions.pop(key, None)
        self._elect_all([key])

    def add_alias(self, alias: str, qualified: str) -> None:
        """Give the command `plugin:name` the extra key `alias` (persisted, re-applied)."""
        key = normalize_key(alias)
        entry = self._qualified.get(qualified.casefold())
        if entry is None:
            raise CommandNotFoundError(f"no command {qualified!r}")
        if key in self._claim_keys(entry):
            return
        own = [c for c in self._claims.get(key, ()) if c.owner == entry.owner]
        if own and self.admin_aliases.get(key) != own[0].qualified:
            # One plugin claims a key once: a second claim would outlive its reload.
            raise ValueError(f"{key!r} is already a command key of plugin {entry.owner!r}")
        if key in self.admin_aliases:  # re-pointed: the old target lets go of it first
            self.remove_alias(key)
        before = self._claimants([key])
        self.admin_aliases[key] = entry.qualified
        self._claims.setdefault(key, []).append(entry)
        self._elect_all([key])
        self._report_clashes(before)

    def remove_alias(self, alias: str) -> None:
        """Withdraw an alias an admin added."""
        key = normalize_key(alias)
        qualified = self.admin_aliases.pop(key, None)
        if qualified is None:
            raise CommandNotFoundError(f"no admin alias {alias!r}")
        claims = [c for c in self._claims.get(key, ()) if c.qualified != qualified]
        if claims:
            self._claims[key] = claims
        else:
            self._claims.pop(key, None)
        self._elect_all([key])

    # -- persistence -------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """What must survive a restart."""
        return {
            "records": dict(self.records),
            "resolutions": dict(self.resolutions),
            "aliases": dict(self.admin_aliases),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `export_state` returned (before any plugin registers)."""
        self.records = dict(state.get("records", {}))
        self.resolutions = dict(state.get("resolutions", {}))
        self.admin_aliases = dict(state.get("aliases", {}))


def _and(items: Iterable[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    names = list(items)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
