"""The tier chain: longest cached prefix across tiers, async stores to lower tiers, promotion to L1.

L1 (CPU memory) is written synchronously; every lower tier gets its own AsyncWriter. A read finds,
for each leading key, the first tier that holds it, fetches lower-tier chunks and promotes them
into L1. A lower tier that raises is treated as a miss for that call, logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch

from kvtier.keys import ChunkKey
from kvtier.logutil import BurstLog
from kvtier.storage.base import BatchReader, StagedBatchReader, StagedReader, Tier
from kvtier.storage.cpu import CPUTier
from kvtier.storage.staging import StagingBuffer
from kvtier.storage.writer import AsyncWriter, WriteJob

log = logging.getLogger("kvtier.storage.chain")
Segment = tuple[Tier, int, int]  # tier, first key index, end key index


class TierChain:
    """L1 (optional) followed by lower tiers, searched in that order."""

    def __init__(self, l1: CPUTier | None, lower: Sequence[Tier] = (), max_pending: int = 256) -> None:
        self.l1 = l1
        self.lower = list(lower)
        self.tiers: list[Tier] = ([l1] if l1 is not None else []) + self.lower
        self.writers = [AsyncWriter(tier, max_pending) for tier in self.lower]
        self._burst = BurstLog(log)

    def add_reader(self, tier: Tier, position: int) -> None:
        """Insert a read-only lower tier (stores never go to it) at `position` among the lower tiers."""
        self.lower.insert(position, tier)
        self.tiers = ([self.l1] if self.l1 is not None else []) + self.lower

    def locate(self, keys: Sequence[ChunkKey]) -> list[Segment]:
        """Split the longest available prefix of `keys` into runs held by one tier each."""
        segments: list[Segment] = []
        n = 0
        while n < len(keys):
            for tier in self.tiers:
                k = self._prefix_len(tier, keys[n:])
                if k:
                    segments.append((tier, n, n + k))
                    n += k
                    break
            else:
                break
        return segments

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """Number of leading keys available in some tier."""
        segments = self.locate(keys)
        return segments[-1][2] if segments else 0

    @contextlib.contextmanager
    def fetch(self, keys: Sequence[ChunkKey], staging: StagingBuffer | None = None) -> Iterator[Iterator[torch.Tensor]]:
        """Yield an iterator over the tensors of the longest retrievable prefix of `keys`, pinned in
        L1 meanwhile; it stops early where a chunk vanished or was corrupt.

        The tensors are the tiers' own: read them, never modify them, and drop them after the block.
        Lower-tier chunks are promoted into L1 as they are read. With `staging`, tiers that can
        read into a caller's buffer do so instead: such a tensor is valid only until the iterator
        advances, and its key goes to `staging.read_keys` for the caller to promote later.
        """
        segments = self.locate(keys)
        end = segments[-1][2] if segments else 0
        pins = self.l1.pinned(keys[:end]) if self.l1 is not None else contextlib.nullcontext()
        stream = self._stream(keys, segments, staging)
        with pins:
            try:
                yield stream
            finally:
                stream.close()  # a consumer that stopped early (an exception) keeps no tier reads alive

    def _stream(
        self, keys: Sequence[ChunkKey], segments: list[Segment], staging: StagingBuffer | None
    ) -> Generator[torch.Tensor, None, None]:
        for tier, start, stop in segments:
            if staging is not None and isinstance(tier, StagedReader):
                got = self._get_staged(tier, keys[start:stop], staging)
            else:
                got = iter(self._get_run(tier, keys[start:stop]))
            n = 0
            for kv in got:
                n += 1
                yield kv
            if n < stop - start:
                return  # a chunk vanished or was corrupt: the prefix ends here

    def _get_run(self, tier: Tier, keys: Sequence[ChunkKey]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        got = tier.get_many(keys) if isinstance(tier, BatchReader) else (self._get(tier, k) for k in keys)
        for key, kv in zip(keys, got, strict=False):
            if kv is None:
                break
            if tier is not self.l1 and self.l1 is not None:
                self.l1.put(key, kv)  # promotion; refused only when L1 is full of pinned chunks
            out.append(kv)
        return out

    def _get_staged(self, tier: Tier, keys: Sequence[ChunkKey], staging: StagingBuffer) -> Iterator[torch.Tensor]:
        if isinstance(tier, StagedBatchReader):
            got = self._batch(tier, keys, staging)
        else:
            got = (self._get(tier, key, staging) for key in keys)
        for key, kv in zip(keys, got, strict=False):
            if kv is None:
                return
            staging.read_keys.append(key)
            yield kv

    def _batch(
        self, tier: StagedBatchReader, keys: Sequence[ChunkKey], staging: StagingBuffer
    ) -> Iterator[torch.Tensor | None]:
        try:
            yield from tier.get_many_into(keys, staging)
        except Exception as exc:  # a broken tier degrades to a miss; the request goes on
            self._failed(tier, "get", exc)

    def promote(self, keys: Sequence[ChunkKey]) -> int:
        """Load lower-tier chunks of the available prefix into L1; return the prefix length in keys."""
        with self.fetch(keys) as tensors:
            return sum(1 for _ in tensors)

    def store(self, key: ChunkKey, kv: torch.Tensor) -> list[WriteJob]:
        """Put `kv` (owned by the chain from now on) into L1 now and queue it for lower tiers."""
        if self.l1 is not None:
            self.l1.put(key, kv)
        return [writer.submit(key, kv) for writer in self.writers]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every pending lower-tier write; False if `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for writer in self.writers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = writer.flush(left) and ok
        return ok

    def close(self) -> None:
        """Finish pending writes and close every tier."""
        for writer in self.writers:
            writer.close()
        for tier in self.tiers:
            tier.close()

    def stats(self) -> dict[str, Any]:
        """Counters of every tier and writer."""
        out: dict[str, Any] = {tier.name: tier.stats.as_dict() for tier in self.tiers}
        for writer in self.writers:
            out[f"{writer.tier.name}_writes"] = asdict(writer.stats) | {"pending": writer.pending}
        return out

    def _prefix_len(self, tier: Tier, keys: Sequence[ChunkKey]) -> int:
        try:
            return tier.prefix_len(keys)
        except Exception as exc:  # a broken tier degrades to a miss; the request goes on
            self._failed(tier, "lookup", exc)
            return 0

    def _get(self, tier: Tier, key: ChunkKey, staging: StagingBuffer | None = None) -> torch.Tensor | None:
        try:
            if staging is not None and isinstance(tier, StagedReader):
                return tier.get_into(key, staging)
            return tier.get(key)
        except Exception as exc:  # a broken tier degrades to a miss; the request goes on
            self._failed(tier, "get", exc)
            return None

    def _failed(self, tier: Any, what: str, exc: Exception) -> None:
        tier.stats.errors += 1
        self._burst.warning(tier.name, "%s: %s failed, treating as a miss: %r", tier.name, what, exc)
