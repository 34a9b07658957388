"""Disjoint sets (union-find): quantizers tied together by what they share."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


class DisjointSets(Generic[Key]):
    """Union-find with path halving; `groups` lists the sets in the order their first member was added."""

    def __init__(self) -> None:
        self._parent: dict[Key, Key] = {}

    def add(self, key: Key) -> None:
        """Make `key` a set of its own unless it is already in one."""
        self._parent.setdefault(key, key)

    def find(self, key: Key) -> Key:
        """The representative of `key`'s set (`key` is added if new)."""
        self.add(key)
        while self._parent[key] != key:
            self._parent[key] = self._parent[self._parent[key]]
            key = self._parent[key]
        return key

    def union(self, key: Key, other: Key) -> None:
        """Merge the sets of `key` and `other` (`other`'s representative stays)."""
        self._parent[self.find(key)] = self.find(other)

    def groups(self) -> list[list[Key]]:
        """Every set, members in the order they were added; sets ordered by their first member."""
        sets: dict[Key, list[Key]] = {}
        for key in self._parent:
            sets.setdefault(self.find(key), []).append(key)
        return list(sets.values())
