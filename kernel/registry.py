"""Owned registries: every entry belongs to a plugin and goes away with it.

Writes are all-or-nothing per owner: `check` validates a whole set of contributions
before anything is written, `commit` swaps an owner's entries in one step, and
`drop_owner` removes everything an owner added.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs

from kernel.errors import ConflictError, ContributionError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Claim(Protocol):
    """A claim on a contested key: it has an owner."""

    @property
    def owner(self) -> str:
        """The plugin that claims the key."""


C = TypeVar("C", bound=Claim)


def elect(claims: Sequence[C], *preferred: str | None) -> C:
    """The claim of the first `preferred` owner that has one, else the earliest claim.

    How a contested registry picks the holder of a key: it passes, in order, the owners
    it prefers (an admin's choice, the recorded holder, the current holder).
    """
    by_owner = {c.owner: c for c in claims}
    for owner in preferred:
        if owner is not None and owner in by_owner:
            return by_owner[owner]
    return claims[0]


def replace_claims(
    claims: dict[str, list[C]], owner: str, new: Mapping[str, C]
) -> tuple[set[str], set[str]]:
    """Swap `owner`'s claims (key -> claims in claim order) for `new` (key -> claim).

    The owner keeps its place in every key it still claims, so a reload does not send
    it to the back of a contest. Returns the keys affected and those it let go of.
    """
    new = dict(new)
    affected, released = set(new), set()
    for key, holders in list(claims.items()):
        for i, claim in enumerate(holders):
            if claim.owner == owner:
                affected.add(key)
                if key in new:
                    holders[i] = new.pop(key)
                else:
                    del holders[i]
                    released.add(key)
                break
        if not holders:
            del claims[key]
    for key, claim in new.items():
        claims.setdefault(key, []).append(claim)
    return affected, released


def drop_claims(claims: dict[str, list[C]], owner: str) -> set[str]:
    """Withdraw every claim of `owner`; return the keys it claimed."""
    affected = set()
    for key, holders in list(claims.items()):
        kept = [c for c in holders if c.owner != owner]
        if len(kept) != len(holders):
            affected.add(key)
            if kept:
                claims[key] = kept
            else:
                del claims[key]
    return affected


@attrs.frozen
class Entry(Generic[V]):
    """One registered item, tagged with its owner plugin and the generation that made it."""

    owner: str
    item: V
    generation: object = attrs.field(eq=False, repr=False, default=None)


class OwnedRegistry(Generic[K, V]):
    """A registry in which a key has exactly one owner; a second claim is a conflict.

    `expand` turns one contributed spec into the items registered for it (a route
    serving two methods is two items); by default a spec is its own item.
    """

    def __init__(
        self,
        kind: str,
        key: Callable[[V], K],
        label: Callable[[K], str] = str,
        expand: Callable[[Any], Iterable[V]] | None = None,
    ) -> None:
        self.kind = kind
        self._key = key
        #: How a key reads in messages (a route's key `(path, method)`: `METHOD path`).
        self.label = label
        self._expand = expand
        self._entries: dict[K, Entry[V]] = {}
        self.version = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[V]]:
        return iter(list(self._entries.values()))

    def get(self, key: K) -> Entry[V] | None:
        """The entry registered under `key`, if any."""
        return self._entries.get(key)

    def owned_by(self, owner: str) -> list[Entry[V]]:
        """The entries of one owner."""
        return [e for e in self._entries.values() if e.owner == owner]

    def items_of(self, specs: Iterable[Any]) -> list[V]:
        """What registering `specs` would add."""
        if self._expand is None:
            return list(specs)
        return [item for spec in specs for item in self._expand(spec)]

    def _clashes(
        self, owner: str, specs: Iterable[Any], *, replacing: bool
    ) -> list[tuple[K, Entry[V]]]:
        seen: set[K] = set()
        out = []
        for item in self.items_of(specs):
            key = self._key(item)
            if key in seen:
                raise ContributionError(
                    f"plugin {owner!r} declares {self.kind} {self.label(key)!r} more than once"
                )
            seen.add(key)
            entry = self._entries.get(key)
            if entry is not None and (entry.owner != owner or not replacing):
                out.append((key, entry))
        return out

    def clashes(self, owner: str, specs: Sequence[Any]) -> list[tuple[str, str]]:
        """The keys of `specs` another plugin holds, as `(label, holder)`; raises
        ContributionError if `specs` repeat a key. The owner's own entries are no clash."""
        return [(self.label(k), e.owner) for k, e in self._clashes(owner, specs, replacing=True)]

    def check(self, owner: str, specs: Sequence[Any], *, replacing: bool = False) -> None:
        """Raise if `specs` clash among themselves or with another owner's entries.

        With `replacing`, the owner's current entries are ignored (a reload).
        """
        for key, entry in self._clashes(owner, specs, replacing=replacing):
            raise ConflictError(self.kind, self.label(key), entry.owner, owner)

    def commit(
        self, owner: str, specs: Sequence[Any], generation: object = None, *, replacing: bool
    ) -> None:
        """Swap the owner's entries for those of `specs` in one step (call `check` first)."""
        self.drop_owner(owner)
        for item in self.items_of(specs):
            self._entries[self._key(item)] = Entry(owner, item, generation)
        self.version += 1

    def drop_owner(self, owner: str, *, transfer: bool = True) -> int:
        """Remove every entry of `owner`; return how many (an exclusive key has no
        next claimant, so `transfer` changes nothing)."""
        keys = [k for k, e in self._entries.items() if e.owner == owner]
        for k in keys:
            del self._entries[k]
        if keys:
            self.version += 1
        return len(keys)

    def export_state(self) -> Mapping[str, Any] | None:
        """Nothing to persist: an exclusive key is held by whoever registers it."""
        return None

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (see `export_state`)."""
