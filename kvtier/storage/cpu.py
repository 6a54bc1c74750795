"""L1: chunk tensors in CPU memory under a byte budget, with a pluggable eviction policy.

Tensors are held as they are (decoded, token-major or head-major: see kvtier.layout), so a hit
costs one memory copy into the caller's buffer. Chunks being read are pinned and never evicted.
All operations take one lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch

from kvtier.keys import ChunkKey
from kvtier.storage.base import TierListener, TierStats
from kvtier.storage.policy import EvictionPolicy, make_policy

log = logging.getLogger("kvtier.storage.cpu")


class CPUTier:
    """In-memory tier with a byte budget; eviction order set by `policy`."""

    def __init__(self, capacity: int, policy: str = "lru", name: str = "l1") -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be non-negative, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.stats = TierStats()
        self._policy: EvictionPolicy[ChunkKey] = make_policy(policy)
        self._data: dict[ChunkKey, torch.Tensor] = {}
        self._pins: dict[ChunkKey, int] = {}
        self._lock = threading.RLock()
        self.listeners: list[TierListener] = []  # told of keys admitted and removed (KV events)

    def contains(self, key: ChunkKey) -> bool:
        return key in self._data

    def prefix_len(self, keys: Sequence[ChunkKey]) -> int:
        data = self._data
        for i, key in enumerate(keys):
            if key not in data:
                return i
        return len(keys)

    def get(self, key: ChunkKey) -> torch.Tensor | None:
        with self._lock:
            kv = self._data.get(key)
            if kv is None:
                self.stats.misses += 1
                return None
            self._policy.touch(key)
            self.stats.hits += 1
            self.stats.bytes_read += kv.nbytes
            return kv

    def put(self, key: ChunkKey, kv: torch.Tensor) -> bool:
        nbytes = kv.nbytes
        with self._lock:
            if key in self._data:
                self._policy.touch(key)
                return True
            if not self._make_room(nbytes):
                self.stats.put_failures += 1
                return False
            self._data[key] = kv
            self._policy.insert(key)
            self.stats.bytes += nbytes
            self.stats.objects += 1
            self.stats.puts += 1
            self.stats.bytes_written += nbytes
            for listener in self.listeners:
                listener(self.name, True, key)
            return True

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.capacity:
            return False
        while self.stats.bytes + nbytes > self.capacity:
            victim = next((k for k in self._policy.victims() if k not in self._pins), None)
            if victim is None:
                log.debug("%s: every chunk is pinned; cannot make room for %d bytes", self.name, nbytes)
                return False
            self._remove(victim)
            self.stats.evictions += 1
        return True

    def _remove(self, key: ChunkKey) -> None:
        kv = self._data.pop(key)
        self._policy.remove(key)
        self.stats.bytes -= kv.nbytes
        self.stats.objects -= 1
        for listener in self.listeners:
            listener(self.name, False, key)

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self._data or key in self._pins:
                return False
            self._remove(key)
            return True

    @contextlib.contextmanager
    def pinned(self, keys: Iterable[ChunkKey]) -> Iterator[None]:
        """Keep `keys` (those present now or put while pinned) from being evicted inside the block."""
        keys = list(keys)
        self.pin(keys)
        try:
            yield
        finally:
            self.unpin(keys)

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        """Keep `keys` from eviction until unpin() (counted: two pins need two unpins)."""
        with self._lock:
            for key in keys:
                self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, keys: Iterable[ChunkKey]) -> int:
        """Undo one pin() of each of `keys`; how many were pinned."""
        done = 0
        with self._lock:
            for key in keys:
                count = self._pins.get(key, 0)
                if count > 1:
                    self._pins[key] = count - 1
                elif count == 1:
                    del self._pins[key]
                done += count > 0
        return done

    def held_keys(self) -> list[ChunkKey]:
        """A snapshot of the keys held."""
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        """Remove every unpinned chunk."""
        with self._lock:
            for key in [k for k in self._data if k not in self._pins]:
                self._remove(key)

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            self._policy = make_policy("lru")
            self.stats.bytes = self.stats.objects = 0

    def check(self) -> None:
        with self._lock:
            total = sum(kv.nbytes for kv in self._data.values())
            assert total == self.stats.bytes, (total, self.stats.bytes)
            assert self.stats.bytes <= self.capacity, (self.stats.bytes, self.capacity)
            assert len(self._data) == self.stats.objects == len(self._policy)
            assert all(key in self._policy for key in self._data)
            assert all(count > 0 for count in self._pins.values())
