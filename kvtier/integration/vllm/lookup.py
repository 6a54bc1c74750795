"""The scheduler's lookup: how many leading tokens every worker rank can load.

vLLM asks the scheduler-side connector `get_num_new_matched_tokens` for each waiting request at
every step, in the EngineCore process, while the KV lives in the worker ranks (other processes
on vLLM's CPU backend, and always under tensor parallelism). A chunk counts when every rank can
load its own shard: from its memory tier, as the rank's published holdings say
(`cluster/holdings.py`: a set probe, no call to another process), or from a tier the scheduler
reaches itself (the shared disk directory, a remote tier; each rank's keys have its own namespace).
A rank may hold chunk i in memory and chunk i+1 only on disk: the two sources alternate along the
prompt. Stale answers are failed loads that vLLM recomputes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvtier.cluster.holdings import HoldingsMirror
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkKey


class SchedulerLookup:
    """`lookup(tokens, salt) -> tokens every rank can load`, for the Planner."""

    def __init__(self, engine: CacheEngine, mirror: HoldingsMirror | None) -> None:
        self.engine = engine
        self.mirror = mirror

    def __call__(self, tokens: Sequence[int], salt: str | None = None) -> int:
        began = time.perf_counter()
        engine = self.engine
        chunks = engine.chunks(tokens, salt=salt)
        n = len(chunks)
        for rank in range(engine.world_size):
            if n == 0:
                break
            keys = [c.key for c in chunks[:n]] if rank == engine.rank else engine.rank_keys(chunks[:n], rank, salt)
            n = self._prefix(rank, keys)
        hit = chunks[n - 1].end if n else 0
        engine.count_lookup(len(tokens), hit, began)
        return hit

    def _prefix(self, rank: int, keys: list[ChunkKey]) -> int:
        """Leading `keys` rank `rank` can load: its memory (mirrored) and the tiers seen from here, in turns."""
        chain, mirror = self.engine.chain, self.mirror
        n = 0
        while n < len(keys):
            before = n
            if mirror is not None:
                n += mirror.prefix(rank, keys[n:])
            if n < len(keys):
                n += chain.lookup(keys[n:])
            if n == before:
                break
        return n

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
