"""The Tier protocol every storage backend implements, and its counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

from kvtier.keys import ChunkKey
from kvtier.storage.staging import StagingBuffer

# Told of every key a tier starts holding (True) or stops holding (False): (tier name, admitted, key).
# Tiers call it under their own lock, so it must be cheap and must never call back into a tier.
TierListener = Callable[[str, bool, ChunkKey], None]


@dataclass(slots=True)
class TierStats:
    """Counters of one tier (monotonic, except the two gauges at the end)."""

    hits: int = 0  # get() calls that returned a tensor
    misses: int = 0  # get() calls that returned None (absent, corrupt or failed)
    puts: int = 0  # objects written
    put_failures: int = 0  # writes refused or failed (no room, I/O error, KV the codec cannot encode)
    evictions: int = 0  # objects removed to make room
    corrupt: int = 0  # objects that failed validation and were deleted
    errors: int = 0  # I/O or backend errors, each degraded to a miss or a failed put
    unavailable: int = 0  # calls answered at once as a miss because the backend is marked down
    bytes_read: int = 0  # bytes of KV returned by get() hits
    bytes_written: int = 0  # bytes of KV accepted by put() (objects written)
    objects: int = 0  # gauge: objects held now
    bytes: int = 0  # gauge: bytes held now

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Tier(Protocol):
    """A key -> canonical chunk tensor store. A miss or a failure returns None or False, never raises."""

    name: str
    stats: TierStats

    def contains(self, key: ChunkKey) -> bool:
        """Whether the tier (probably) holds `key`; a later get() may still miss."""
        ...

    def prefix_len(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading `keys` the tier holds (one round trip where the backend allows)."""
        ...

    def get(self, key: ChunkKey) -> torch.Tensor | None:
        """The validated tensor stored under `key`, or None."""
        ...

    def put(self, key: ChunkKey, kv: torch.Tensor) -> bool:
        """Store `kv` (which the tier may keep; callers never modify it afterwards). True if held."""
        ...

    def delete(self, key: ChunkKey) -> bool:
        """Remove `key`; True if it was there."""
        ...

    def close(self) -> None:
        """Release resources; the tier is unusable afterwards."""
        ...

    def check(self) -> None:
        """Assert the tier's internal invariants (used by tests after every mutation)."""
        ...


@runtime_checkable
class BatchReader(Protocol):
    """A tier that reads several keys per round trip (remote tiers); it never raises."""

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """The tensors of `keys` in order, None where a key is missing, corrupt or failed."""
        ...


@runtime_checkable
class StagedReader(Protocol):
    """A tier that can read a chunk into a caller's reusable buffer instead of fresh memory."""

    def get_into(self, key: ChunkKey, staging: StagingBuffer) -> torch.Tensor | None:
        """Like get(), but the tensor may live in `staging` or in the tier's own storage (a mapped
        file): read it at once; it is valid until the next read through `staging`."""
        ...


@runtime_checkable
class StagedBatchReader(Protocol):
    """A StagedReader that reads a run of keys at once (validating ahead, in parallel)."""

    def get_many_into(self, keys: Sequence[ChunkKey], staging: StagingBuffer) -> Iterator[torch.Tensor]:
        """get_into() for each of `keys` in order, stopping at the first miss. Each tensor is valid
        until the next one is taken; it never raises for a missing or corrupt object."""
        ...


def leading_present(tier: Tier, keys: Sequence[ChunkKey]) -> int:
    """Default prefix_len: contains() key by key until the first miss."""
    for i, key in enumerate(keys):
        if not tier.contains(key):
            return i
    return len(keys)
