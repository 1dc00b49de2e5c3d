"""Owner-keyed registries: every entry belongs to a plugin and goes away with it.

Writes are all-or-nothing per owner: `check` validates a whole set of contributions
before anything is written, and `drop_owner` removes everything an owner added.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

import attrs

from kernel.errors import ConflictError, ContributionError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@attrs.frozen
class Entry(Generic[V]):
    """One registered item, tagged with its owner plugin and the generation that made it."""

    owner: str
    item: V
    generation: object = attrs.field(eq=False, repr=False, default=None)


class OwnedRegistry(Generic[K, V]):
    """A registry in which a key has exactly one owner; a second claim is a conflict."""

    def __init__(self, kind: str, key: Callable[[V], K], label: Callable[[K], str] = str) -> None:
        self.kind = kind
        self._key = key
        #: How a key reads in messages (a route's key `(path, method)`: `METHOD path`).
        self.label = label
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

    def clashes(
        self, owner: str, items: Iterable[V], *, replacing: bool = False
    ) -> list[tuple[K, Entry[V]]]:
        """The keys of `items` already taken, with the entries that hold them; raises
        ContributionError if `items` repeat a key.

        With `replacing`, the owner's current entries are no clash (a reload).
        """
        seen: set[K] = set()
        out = []
        for item in items:
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

    def check(self, owner: str, items: Iterable[V], *, replacing: bool = False) -> None:
        """Raise if `items` clash among themselves or with another owner's entries.

        With `replacing`, the owner's current entries are ignored (a reload).
        """
        for key, entry in self.clashes(owner, items, replacing=replacing):
            raise ConflictError(self.kind, self.label(key), entry.owner, owner)

    def add(self, owner: str, items: Iterable[V], generation: object = None) -> None:
        """Register `items` for `owner` (call `check` first)."""
        for item in items:
            self._entries[self._key(item)] = Entry(owner, item, generation)
        self.version += 1

    def drop_owner(self, owner: str) -> int:
        """Remove every entry of `owner`; return how many."""
        keys = [k for k, e in self._entries.items() if e.owner == owner]
        for k in keys:
            del self._entries[k]
        if keys:
            self.version += 1
        return len(keys)

    def replace_owner(self, owner: str, items: Iterable[V], generation: object = None) -> None:
        """Swap the owner's entries for `items` in one step."""
        self.drop_owner(owner)
        self.add(owner, items, generation)
