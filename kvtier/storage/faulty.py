"""A fault-injecting wrapper tier for failure tests: errors, slowness and silent data loss on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from kvtier.keys import ChunkKey
from kvtier.storage.base import StagedReader, Tier, TierStats
from kvtier.storage.staging import StagingBuffer


class FaultyTier:
    """Wraps a tier; each operation can raise, stall, or (for get) lose data, as the test sets."""

    def __init__(self, inner: Tier, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or f"faulty-{inner.name}"
        self.stats = TierStats()
        self.fail_get = False  # get() raises
        self.fail_put = False  # put() raises
        self.fail_lookup = False  # contains()/prefix_len() raise
        self.lose_data = False  # get() returns None although the data is there
        self.delay = 0.0  # seconds every operation sleeps first
        self.gate: threading.Event | None = None  # when set to an Event, put() waits for it
        self.calls: dict[str, int] = {}

    def _enter(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.delay:
            time.sleep(self.delay)

    def contains(self, key: ChunkKey) -> bool:
        self._enter("contains")
        if self.fail_lookup:
            raise ConnectionError("injected lookup failure")
        return self.inner.contains(key)

    def prefix_len(self, keys: Sequence[ChunkKey]) -> int:
        self._enter("prefix_len")
        if self.fail_lookup:
            raise ConnectionError("injected lookup failure")
        return self.inner.prefix_len(keys)

    def get(self, key: ChunkKey) -> torch.Tensor | None:
        self._enter("get")
        if self.fail_get:
            raise ConnectionError("injected get failure")
        if self.lose_data:
            return None
        return self.inner.get(key)

    def get_into(self, key: ChunkKey, staging: StagingBuffer) -> torch.Tensor | None:
        self._enter("get_into")
        if self.fail_get:
            raise ConnectionError("injected get failure")
        if self.lose_data:
            return None
        return self.inner.get_into(key, staging) if isinstance(self.inner, StagedReader) else self.inner.get(key)

    def put(self, key: ChunkKey, kv: torch.Tensor) -> bool:
        self._enter("put")
        if self.gate is not None:
            self.gate.wait()
        if self.fail_put:
            raise ConnectionError("injected put failure")
        return self.inner.put(key, kv)

    def delete(self, key: ChunkKey) -> bool:
        self._enter("delete")
        return self.inner.delete(key)

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.inner.close()

    def check(self) -> None:
        self.inner.check()
