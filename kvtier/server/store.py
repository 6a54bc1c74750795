"""The kvtier server's storage: validated objects in memory (the L1 tier) and optionally on disk (L2).

Objects are held as uint8 tensors of their whole framed bytes (header + payload), keyed by ChunkKey:
memory is a `CPUTier` (byte budget, eviction policy), the disk a `ObjectDiskTier`. The disk is
written through: every stored object goes to both, so an object evicted from memory is already on
disk (eviction costs nothing), and a restarted server finds everything it had acknowledged. A disk
hit is promoted back into memory.

Only valid kvtier objects are stored: the header parses, holds the requested key and the payload has
the header's length and checksum. Blocking methods (disk I/O, hashing) are meant for worker
threads; `get_memory` and `in_memory` are cheap enough for the event loop. Both tiers take their
own locks, so every method is thread-safe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from kvtier.codec.framing import HEADER_SIZE, check_payload, parse_header
from kvtier.errors import CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.storage.cpu import CPUTier
from kvtier.storage.objects import ObjectDiskTier

log = logging.getLogger("kvtier.server.store")


def validate_object(key: ChunkKey, data: bytearray | memoryview) -> None:
    """Raise CorruptObjectError unless `data` is a whole, intact kvtier object stored under `key`."""
    header = parse_header(data)
    if header.key != key:
        raise CorruptObjectError(f"object holds {header.key}, sent as {key}")
    check_payload(header, memoryview(data)[HEADER_SIZE:])


class ObjectCache:
    """Whole framed objects: a memory budget with eviction, and an optional write-through disk."""

    def __init__(
        self,
        memory: int,
        disk_path: str | os.PathLike[str] | None = None,
        disk_size: int = 0,
        policy: str = "lru",
        fsync: bool = False,
    ) -> None:
        self.memory = CPUTier(memory, policy, name="memory")
        self.disk = ObjectDiskTier(disk_path, disk_size, policy, fsync, name="disk") if disk_path else None

    def put(self, key: ChunkKey, data: memoryview) -> tuple[bool, bool]:
        """Validate and store `data` (kept, not copied); (in memory, on disk). CorruptObjectError if invalid."""
        validate_object(key, data)
        obj = torch.frombuffer(data, dtype=torch.uint8)  # shares `data`: no copy
        on_disk = self.disk is not None and self.disk.put(key, obj)
        return self.memory.put(key, obj), on_disk

    def get_memory(self, key: ChunkKey) -> torch.Tensor | None:
        """The object if it is in memory (no I/O)."""
        return self.memory.get(key)

    def get_disk(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """Read `keys` from the disk (validated) and promote the hits into memory; blocking."""
        if self.disk is None:
            return [None] * len(keys)
        found = [self.disk.get(key) for key in keys]
        for key, obj in zip(keys, found, strict=True):
            if obj is not None:
                self.memory.put(key, obj)
        return found

    def in_memory(self, key: ChunkKey) -> bool:
        """Whether memory holds `key` (no I/O)."""
        return self.memory.contains(key)

    def on_disk(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether the disk holds each of `keys`; blocking (a stat per unknown key)."""
        if self.disk is None:
            return [False] * len(keys)
        return [self.disk.contains(key) for key in keys]

    def delete(self, key: ChunkKey) -> bool:
        """Remove `key` from both tiers; True if either held it. Blocking."""
        in_memory = self.memory.delete(key)
        on_disk = self.disk is not None and self.disk.delete(key)
        return in_memory or on_disk

    @property
    def has_disk(self) -> bool:
        return self.disk is not None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters and gauges of each tier, with its capacity."""
        out = {"memory": {**self.memory.stats.as_dict(), "capacity": self.memory.capacity}}
        if self.disk is not None:
            out["disk"] = {**self.disk.stats.as_dict(), "capacity": self.disk.capacity}
        return out

    def check(self) -> None:
        """Assert both tiers' invariants (tests)."""
        self.memory.check()
        if self.disk is not None:
            self.disk.check()

    def close(self) -> None:
        """Release memory; disk objects stay for the next start."""
        self.memory.close()
        if self.disk is not None:
            self.disk.close()
