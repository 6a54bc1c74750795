"""Eviction policies, apart from storage: each tracks keys and names the next victims, in O(1).

A policy never removes anything itself; the tier asks `victims()` for candidates in eviction order
and skips the ones it cannot evict (pinned chunks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(Protocol[K]):
    """Tracks the keys of a tier and orders them for eviction."""

    def insert(self, key: K) -> None: ...
    def touch(self, key: K) -> None: ...
    def remove(self, key: K) -> None: ...
    def victims(self) -> Iterator[K]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...


class LRU(Generic[K]):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: K) -> None:
        self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[K]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class FIFO(LRU[K]):
    """First inserted first; reads do not change the order."""

    def touch(self, key: K) -> None:
        pass


class MRU(LRU[K]):
    """Most recently used first (good for cyclic scans larger than the cache)."""

    def victims(self) -> Iterator[K]:
        return reversed(self._order)


class LFU(Generic[K]):
    """Least frequently used first; ties broken by least recent use.

    O(1) per operation, except removing the last key of the least-frequent bucket outside eviction,
    which rescans the distinct frequencies (few in practice).
    """

    def __init__(self) -> None:
        self._freq: dict[K, int] = {}
        self._buckets: dict[int, OrderedDict[K, None]] = {}
        self._min = 0

    def insert(self, key: K) -> None:
        self.remove(key)
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def touch(self, key: K) -> None:
        freq = self._freq[key]
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
            if self._min == freq:
                self._min = freq + 1
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None

    def remove(self, key: K) -> None:
        freq = self._freq.pop(key, None)
        if freq is None:
            return
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
            if self._min == freq:
                self._min = min(self._buckets, default=0)

    def victims(self) -> Iterator[K]:
        # Callers stop iterating before they mutate, so the live buckets can be walked directly.
        if self._min in self._buckets:
            yield from self._buckets[self._min]
        for freq in sorted(self._buckets):  # only reached when the least frequent are all pinned
            if freq != self._min:
                yield from self._buckets[freq]

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


POLICIES: dict[str, type] = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "mru": MRU}


def make_policy(name: str) -> EvictionPolicy[Any]:
    """Instantiate the policy called `name` (lru, lfu, fifo, mru)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}")
    policy: EvictionPolicy[Any] = POLICIES[name]()
    return policy
