"""CacheEngine: lookup / store / retrieve / prefetch of KV over token sequences.

The engine owns the chunking and keys (keys.py), the tiers (storage/) and the layout checks; it
knows nothing about serving engines, HTTP, metrics or the cluster (kvtier.node starts those).
Adapters use `store_chunks` and `retrieve_into` to move KV between an engine's own memory and
chunk tensors without an intermediate full-size copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import xxhash

from kvtier.codec import canonical
from kvtier.config import Config
from kvtier.errors import LayoutError
from kvtier.keys import (
    Chunk,
    ChunkHasher,
    ChunkKey,
    SaltedHashers,
    make_namespace,
    salted_namespace,
    token_bytes,
)
from kvtier.layout import KVLayout, is_head_major
from kvtier.logutil import setup_logging
from kvtier.storage.build import build_chain
from kvtier.storage.chain import TierChain
from kvtier.storage.cpu import CPUTier
from kvtier.storage.filetier import FileTier
from kvtier.storage.staging import StagingBuffer, StagingPool

log = logging.getLogger("kvtier.engine")
Gather = Callable[[int, int], torch.Tensor]  # (start, end) -> a fresh canonical tensor of those tokens
Scatter = Callable[[int, int, torch.Tensor], None]  # (start, end, canonical tensor) -> None
Observer = Callable[[str, float], None]  # (operation, seconds): "lookup", "retrieve" or "store" took that long
_BACKGROUND_NICE = 10  # nice value of the prefetch/promotion thread (Linux threads have their own)
# seconds a promotion waits for the request that read the chunks to finish its prefill (signalled by
# the next store or flush): promoting copies and faults in fresh memory, which would slow that prefill
_PROMOTE_WAIT_S = 1.0
# Gathered chunks handed to the tiers at once, at most (memory held outside L1's budget meanwhile).
HANDOFF_BYTES = 1 << 30
_MEMO_SIZE = 32  # token sequences whose chunk keys are remembered (lookup, retrieve, store of one prompt)


class CacheEngine:
    """Stores and reuses the KV cache of token sequences for one model and KV layout."""

    def __init__(
        self,
        config: Config | None = None,
        layout: KVLayout | None = None,
        model_id: str = "default",
        *,
        rank: int = 0,
        world_size: int = 1,
        chain: TierChain | None = None,
    ) -> None:
        if layout is None:
            raise LayoutError("CacheEngine needs the model's KVLayout")
        self.config = config or Config()
        self.layout = layout
        self.model_id = model_id
        self.rank, self.world_size = rank, world_size
        setup_logging(self.config.log_level)
        namespace = self._namespace(rank)
        self.hasher = ChunkHasher(self.config.chunk_size, namespace, self.config.hash, self.config.save_partial_chunks)
        self._hashers = SaltedHashers(self.hasher)
        self.chain = chain if chain is not None else build_chain(self.config, layout)
        # one batch alone never overflows a writer's queue (the chain's own: it may be shared, built elsewhere)
        queue = min((writer.max_pending for writer in self.chain.writers), default=self.config.write_queue)
        self._handoff_chunks = max(1, queue // 2)
        self._memo: OrderedDict[tuple[str, int, bytes], list[Chunk]] = OrderedDict()
        self._memo_lock = threading.Lock()
        self.counters = EngineCounters()
        self._staging = StagingPool()
        # prefetches and promotions: one thread, below the serving engine's threads in priority
        self._prefetcher = ThreadPoolExecutor(1, "kvtier-prefetch", initializer=_background_priority)
        self._prefill_done = threading.Event()  # set by store and flush: deferred promotions may run
        self._closed = False
        self.observer: Observer | None = None  # told how long each lookup, retrieve and store took (metrics)
        if self.config.admin.port or self.config.cluster.controller_url:
            log.warning("CacheEngine ignores the admin and cluster settings (admin.port %s, cluster.controller_url "
                        "%s): build a kvtier.node.Node to start those services", self.config.admin.port,
                        self.config.cluster.controller_url)  # fmt: skip

    def _namespace(self, rank: int) -> bytes:
        return make_namespace(
            self.model_id, self.layout.fingerprint, rank=rank, world_size=self.world_size,
            codec=canonical(self.config.codec), tenant=self.config.tenant, hash_name=self.config.hash,
        )  # fmt: skip

    def rank_keys(self, chunks: list[Chunk], rank: int, salt: str | None = None) -> list[ChunkKey]:
        """The keys tensor-parallel rank `rank` of this engine's group stores `chunks` under: the
        same digests, that rank's namespace (salted as `chunks` were)."""
        namespace = self._namespace(rank)
        if salt:
            namespace = salted_namespace(namespace, salt)
        return [ChunkKey(namespace, chunk.key.digest) for chunk in chunks]

    def local_tiers(self) -> list[CPUTier | FileTier]:
        """This instance's own tiers (L1 and disk), not shared remote or peer tiers."""
        return [t for t in self.chain.tiers if isinstance(t, (CPUTier, FileTier))]

    # --- keys --------------------------------------------------------------------------------------

    def chunks(self, tokens: Any, start: int = 0, salt: str | None = None) -> list[Chunk]:
        """The chunks of `tokens` from token `start` (a multiple of the chunk size) on.

        Every method taking `tokens` also takes a `salt`: the KV of requests with different salts
        is kept apart (their keys have different namespaces), as with vLLM's per-request
        `cache_salt`. No salt (None or "") is the engine's own namespace."""
        data = token_bytes(tokens)
        memo_key = (salt or "", start, xxhash.xxh3_128_digest(data))
        with self._memo_lock:
            hit = self._memo.get(memo_key)
            if hit is not None:
                self._memo.move_to_end(memo_key)
                return hit
        chunks = self._hashers.get(salt).chunks_of_bytes(data, start)
        with self._memo_lock:
            self._memo[memo_key] = chunks
            if len(self._memo) > _MEMO_SIZE:
                self._memo.popitem(last=False)
        return chunks

    # --- the public API ----------------------------------------------------------------------------

    def lookup(self, tokens: Any, salt: str | None = None) -> int:
        """How many leading tokens of `tokens` are available in some tier."""
        began = time.perf_counter()
        chunks = self.chunks(tokens, salt=salt)
        n = self.chain.lookup([c.key for c in chunks])
        hit = chunks[n - 1].end if n else 0
        self.count_lookup(len(tokens), hit, began)
        return hit

    def count_lookup(self, tokens: int, hit: int, began: float) -> None:
        """Count a lookup of `tokens` tokens that found `hit`, begun at `began` (perf_counter), in
        the counters and the observer; for lookups made around the engine (the vLLM scheduler's)."""
        self.counters.lookups += 1
        self.counters.lookup_tokens += tokens
        self.counters.lookup_hit_tokens += hit
        if self.observer is not None:
            self.observer("lookup", time.perf_counter() - began)

    def store(self, tokens: Any, kv: torch.Tensor, start: int = 0, salt: str | None = None) -> int:
        """Store `kv`, the canonical KV of tokens[start:start + kv.shape[2]]; return tokens newly stored.

        `start` must be a multiple of the chunk size. L1 is written now; lower tiers asynchronously.
        """
        self.layout.check(kv)
        end = start + kv.shape[2]
        if end > len(tokens):
            raise LayoutError(f"KV covers tokens [{start}, {end}) but only {len(tokens)} tokens were given")

        def gather(lo: int, hi: int) -> torch.Tensor:
            out = self.layout.empty(hi - lo, head_major=is_head_major(kv))  # in the caller's memory order
            return out.copy_(kv[:, :, lo - start : hi - start])

        return self.store_chunks(tokens, gather, start, end, salt)

    def store_chunks(
        self, tokens: Any, gather: Gather, start: int = 0, end: int | None = None, salt: str | None = None
    ) -> int:
        """Store chunks of tokens[start:end] whose KV `gather(lo, hi)` returns (a fresh CPU tensor).

        Chunks already in L1 are skipped without calling `gather`. Returns tokens newly stored.
        Chunks reach the tiers (L1 now, lower tiers on their writer threads) in batches of up to
        `HANDOFF_BYTES` or half the write queue, each once it is gathered whole: a writer encoding
        and writing files while the gather copies run takes a core from torch's OpenMP copies,
        which then wait for each other (on 2 cores a cold 8k-token store in vLLM took 0.46-1.02 s
        chunk by chunk, 0.077-0.112 s gathered first). If `gather` raises, the chunks gathered
        before it are stored and the error propagates.
        """
        began = time.perf_counter()
        end = len(tokens) if end is None else end
        chunks = self.chunks(tokens if end == len(tokens) else tokens[:end], start, salt)
        l1 = self.chain.l1
        batch: list[tuple[Chunk, torch.Tensor]] = []
        batch_bytes = stored = 0
        try:
            for chunk in chunks:
                if l1 is not None and l1.contains(chunk.key):
                    continue
                kv = gather(chunk.start, chunk.end)
                self.layout.check(kv, chunk.num_tokens)
                batch.append((chunk, kv))
                batch_bytes += kv.nbytes
                if batch_bytes >= HANDOFF_BYTES or len(batch) >= self._handoff_chunks:
                    stored += self._hand_over(batch)
                    batch_bytes = 0
        finally:
            stored += self._hand_over(batch)
            self.counters.stored_tokens += stored
            self._prefill_done.set()  # a request stores after its prefill: deferred promotions may run
            if self.observer is not None:
                self.observer("store", time.perf_counter() - began)
        return stored

    def _hand_over(self, batch: list[tuple[Chunk, torch.Tensor]]) -> int:
        """Give a batch of gathered chunks to the tiers and empty it (also when a tier raises: no
        chunk is handed over twice); return its tokens."""
        try:
            for chunk, kv in batch:
                self.chain.store(chunk.key, kv)
            return sum(chunk.num_tokens for chunk, _ in batch)
        finally:
            batch.clear()

    def retrieve(self, tokens: Any, max_tokens: int | None = None, salt: str | None = None) -> torch.Tensor:
        """Canonical KV of the longest cached prefix of `tokens` (possibly 0 tokens), on the CPU."""
        parts: list[tuple[int, int, torch.Tensor]] = []
        chunks = self.chunks(tokens, salt=salt)
        n = self._deliver(chunks, lambda lo, hi, kv: parts.append((lo, hi, kv)), max_tokens, 0, None)
        out = self.layout.empty(n)
        for lo, hi, kv in parts:
            out[:, :, lo:hi].copy_(kv)
        return out

    def retrieve_into(
        self,
        tokens: Any,
        scatter: Scatter,
        max_tokens: int | None = None,
        chunks: list[Chunk] | None = None,
        start: int = 0,
        device: torch.device | str | None = None,
        salt: str | None = None,
    ) -> int:
        """Call `scatter(lo, hi, kv)` for each cached chunk of tokens [start, max_tokens); return the
        end of what was delivered (`start` when nothing was).

        Chunks are delivered in order and stop at the first one not cached. The first chunk is cut
        to begin at `start` and the last to end at `max_tokens`. `kv` belongs to the cache and may
        be overwritten once `scatter` returns: copy from it inside `scatter`, never keep or modify
        it. Lower-tier chunks are read into a reused buffer and promoted into L1 in the background.
        `device` is where `scatter` copies to: a disk chunk stored with a compressing codec is
        decoded there (so `kv` may be on that device); other chunks arrive on the CPU.
        """
        chunks = self.chunks(tokens, salt=salt) if chunks is None else chunks
        target = None if device is None else torch.device(device)
        with self._staging.buffer(target) as staging:
            delivered = self._deliver(chunks, scatter, max_tokens, start, staging)
            self._after_prefill(list(staging.read_keys), staging.take_held())
        return delivered

    def _deliver(
        self, chunks: list[Chunk], scatter: Scatter, max_tokens: int | None, start: int, staging: StagingBuffer | None
    ) -> int:
        began = time.perf_counter()
        stop = len(chunks) if max_tokens is None else sum(1 for c in chunks if c.start < max_tokens)
        first = sum(1 for c in chunks[:stop] if c.end <= start)
        wanted = chunks[first:stop]
        delivered = start
        with self.chain.fetch([c.key for c in wanted], staging) as tensors:
            for chunk, kv in zip(wanted, tensors, strict=False):  # tensors may stop early
                lo = max(chunk.start, start)
                hi = chunk.end if max_tokens is None else min(chunk.end, max_tokens)
                if lo != chunk.start or hi != chunk.end:
                    kv = kv[:, :, lo - chunk.start : hi - chunk.start]
                scatter(lo, hi, kv)
                delivered = hi
        self.counters.retrieved_tokens += delivered - start
        if self.observer is not None:
            self.observer("retrieve", time.perf_counter() - began)
        return delivered

    def _after_prefill(self, keys: list[ChunkKey], held: list[object]) -> None:
        """Once the request that read `keys` from lower tiers has stored its new chunks (the end of
        its prefill) or after a second, on the background thread: release the mapped files it read
        (`held`: unmapping costs ~1 ms per 30 MB, kernel work that would otherwise sit on the
        request path) and copy those chunks into L1."""
        if self._closed or not (keys or held):
            return
        promote = self.chain.l1 is not None and bool(keys)
        self._prefill_done.clear()
        deadline = time.monotonic() + _PROMOTE_WAIT_S  # from now: queued jobs must not add up their waits

        def run() -> int:
            self._prefill_done.wait(max(0.0, deadline - time.monotonic()))
            held.clear()
            return self.chain.promote(keys) if promote else 0

        self._prefetcher.submit(run).add_done_callback(_log_failure)

    def prefetch(self, tokens: Any, salt: str | None = None) -> Future[int]:
        """Start loading the cached prefix of `tokens` from lower tiers into L1; the future gives its length."""
        chunks = self.chunks(tokens, salt=salt)
        keys = [c.key for c in chunks]

        def run() -> int:
            n = self.chain.promote(keys)
            return chunks[n - 1].end if n else 0

        future = self._prefetcher.submit(run)
        future.add_done_callback(_log_failure)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every pending store reached every tier and every pending promotion reached L1;
        False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = self.chain.flush(timeout)
        self._prefill_done.set()
        marker = self._prefetcher.submit(lambda: None)  # one worker: earlier jobs finish first
        try:
            marker.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return ok

    def clear(self) -> int:
        """Remove every chunk this instance holds (L1 and disk; a shared remote tier is left alone);
        return how many were removed. Chunks being read stay."""
        self.flush()
        removed = 0
        for tier in self.local_tiers():
            removed += sum(tier.delete(key) for key in tier.held_keys())
        return removed

    def close(self) -> None:
        """Finish pending stores and release the tiers."""
        if self._closed:
            return
        self._closed = True
        self._prefill_done.set()  # deferred jobs run now instead of waiting out their second
        self._prefetcher.shutdown(wait=True)
        self.chain.close()

    def stats(self) -> dict[str, Any]:
        """Counters of the engine ("engine") and of every tier and writer."""
        return {"engine": asdict(self.counters), **self.chain.stats()}

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class EngineCounters:
    """Token-level counters of one engine (monotonic)."""

    lookups: int = 0
    lookup_tokens: int = 0  # tokens looked up
    lookup_hit_tokens: int = 0  # of those, found cached
    retrieved_tokens: int = 0  # tokens delivered by retrieve / retrieve_into
    stored_tokens: int = 0  # tokens newly stored


def _background_priority() -> None:
    """Lower the calling thread's CPU priority, so background loads yield to the serving engine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux (priority is per process there) or not permitted
        log.debug("background loads run at normal priority")


def _log_failure(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("prefetch failed: %r", exc)
