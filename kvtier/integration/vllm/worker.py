"""Worker side of the vLLM connector: loads planned ranges into paged KV memory and stores new chunks.

A failed or partial load never raises into vLLM: the blocks it could not fill are reported
through `take_load_errors()`, and vLLM recomputes them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch

from kvtier.adapters.paged import PagedKV
from kvtier.engine import CacheEngine
from kvtier.errors import LayoutError
from kvtier.integration.vllm.cpu_check import as_layout_dtype, cpu_block_orders
from kvtier.integration.vllm.plan import LoadSpec, StepPlan, StoreSpec
from kvtier.layout import compact

log = logging.getLogger("kvtier.vllm.worker")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_MAX_FAILED = 4096  # requests remembered for a failed load


def layer_order(names: list[str]) -> list[str]:
    """Layer names sorted by the first number in them ("model.layers.10.self_attn.attn" -> 10)."""

    def index(name: str) -> tuple[int, str]:
        match = _LAYER_INDEX.search(name)
        return (int(match.group(1)) if match else -1, name)

    return sorted(names, key=index)


def detect_kind(cache: torch.Tensor, head_dim: int, block_size: int, mla: bool) -> str:
    """Which paged layout a layer's KV tensor uses, from its shape."""
    if mla and cache.dim() == 3:
        return "mla"
    if cache.dim() == 4 and cache.shape[-1] == 2 * head_dim:
        return "cpu"
    if cache.dim() == 5 and cache.shape[0] == 2:
        return "flash_nhd" if cache.shape[2] == block_size else "flash_hnd"
    if cache.dim() == 5 and cache.shape[1] == 2:
        return "flashinfer"
    raise LayoutError(f"unsupported vLLM KV cache shape {tuple(cache.shape)} (block size {block_size})")


Agree = Callable[[torch.Tensor], None]  # reduces per-load failure flags in place (max) across TP ranks


class Worker:
    """Moves KV between one worker's paged memory and a CacheEngine.

    With tensor parallelism each rank loads its own shard of a request's KV; `agree` combines the
    ranks' failure flags, so that no rank stores what was computed over another rank's failed load
    (layers after the first mix every head's values).
    """

    def __init__(
        self, engine: CacheEngine, block_size: int, agree: Agree | None = None,
        model_dtype: torch.dtype | None = None, cache_dtype: str = "auto",
    ) -> None:  # fmt: skip
        self.engine = engine
        self.block_size = block_size
        self.agree = agree
        self.model_dtype = model_dtype  # what vLLM's forward computes in (the layout's dtype if None)
        self.cache_dtype = cache_dtype  # vLLM's kv_cache_dtype: "auto" or an fp8 one
        self.paged: PagedKV | None = None
        self._load_errors: set[int] = set()
        self._failed: dict[str, int] = {}  # request -> generation whose KV was computed over a failed load
        # blocks of this step's failed loads, and of the step before (async scheduling plans a step
        # ahead): another request sharing them through vLLM's prefix cache computed over them too
        self._tainted: tuple[set[int], set[int]] = (set(), set())
        self.loaded_tokens = 0
        self.stored_tokens = 0

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Adopt vLLM's per-layer KV tensors (in layer order)."""
        layout = self.engine.layout
        if len(kv_caches) != layout.num_layers:
            raise LayoutError(
                f"vLLM registered {len(kv_caches)} KV cache layers for a model of {layout.num_layers}: kvtier "
                "needs one per layer (more come from a speculative-decoding draft model such as EAGLE or MTP, "
                "fewer from a hybrid model with Mamba layers; neither is supported yet, n-gram speculation is)"
            )
        caches = [as_layout_dtype(kv_caches[name], layout.dtype) for name in layer_order(list(kv_caches))]
        kind = detect_kind(caches[0], layout.head_dim, self.block_size, layout.mla)
        orders = None
        if kind == "cpu" and caches[0].device.type == "cpu":  # as the kernel vLLM picked writes its blocks
            orders = cpu_block_orders(layout, self.block_size, self.model_dtype, self.cache_dtype)
        self.paged = PagedKV(kind, layout, caches, self.block_size, orders)
        log.info("registered %d layers of %s paged KV (block size %d)", len(caches), kind, self.block_size)

    def load(self, plan: StepPlan) -> None:
        """Fill the planned ranges; blocks that could not be filled go to the load errors."""
        short = torch.zeros(len(plan.loads), dtype=torch.int32)
        for i, spec in enumerate(plan.loads):
            try:
                got = self._load(spec)
            except Exception:  # a cache failure must never crash the engine: vLLM recomputes
                log.exception("loading %s tokens [%d, %d) failed", spec.req_id, spec.start, spec.end)
                got = spec.start
            if got < spec.end:
                short[i] = 1
                self._load_errors.update(self._span(spec.block_ids, got, spec.end))
                log.warning("%s: loaded %d of %d tokens; vLLM recomputes the rest", spec.req_id,
                            got - spec.start, spec.end - spec.start)  # fmt: skip
            self.loaded_tokens += got - spec.start
            log.info("%s: loaded %d tokens [%d, %d) from the cache", spec.req_id, got - spec.start, spec.start, got)
        if self.agree is not None and len(plan.loads):  # every rank has the same plan: all of them get here
            try:
                self.agree(short)
            except Exception:  # ranks that cannot agree store nothing of this step's loads
                log.exception("combining load results across tensor-parallel ranks failed")
                short.fill_(1)
        tainted: set[int] = set()
        for spec, failed in zip(plan.loads, short.tolist(), strict=True):
            if not failed:
                self._failed.pop(spec.req_id, None)  # a request id seen before, loaded in full
                continue
            self._mark_failed(spec.req_id, spec.generation)
            # the whole range: another rank may have failed earlier in it than this one
            tainted.update(self._span(spec.block_ids, spec.start, spec.end))
        self._tainted = (tainted, self._tainted[0])

    def _over_failed_load(self, spec: StoreSpec) -> bool:
        """Whether `spec`'s blocks include one of a failed load's, this step or the last."""
        if not (self._tainted[0] or self._tainted[1]):
            return False
        return any(block in taint for block in self._span(spec.block_ids, 0, spec.end) for taint in self._tainted)

    def _span(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """The ids of the blocks holding tokens [start, end)."""
        return block_ids[start // self.block_size : -(-end // self.block_size)]

    def _mark_failed(self, req_id: str, generation: int) -> None:
        self._failed[req_id] = generation
        while len(self._failed) > _MAX_FAILED:  # requests that never stored again
            del self._failed[next(iter(self._failed))]

    def _load(self, spec: LoadSpec) -> int:
        paged = self._paged()
        ids = torch.tensor(spec.block_ids, dtype=torch.long)
        return self.engine.retrieve_into(
            spec.tokens, lambda lo, hi, kv: paged.scatter(ids, lo, kv), max_tokens=spec.end, start=spec.start,
            device=paged.device, salt=spec.salt,
        )  # fmt: skip

    def save(self, plan: StepPlan) -> None:
        """Store the planned ranges' chunks that the cache does not hold yet.

        Nothing planned in the generation of a request's failed load is stored: that forward pass
        attended to blocks that were never filled, so the KV it computed is wrong. The same holds
        for any request whose blocks include those of a failed load (vLLM's prefix cache shares
        them), in this step or the next, whatever its generation (a request resumed after a
        preemption gets such blocks from the prefix cache without computing them): a miss later
        rather than wrong KV. vLLM drops the step's token and recomputes from the first failed
        block; the planner plans the stores of that recompute in the next generation, which no
        taint stops (`after_rollback`: it recomputed every failed block it holds).
        """
        for spec in plan.stores:
            failed = self._failed.get(spec.req_id)
            # after vLLM's rollback the request recomputed every block from its first failed one
            fresh = failed is None or spec.generation > failed
            if fresh and not spec.after_rollback and self._over_failed_load(spec):
                self._mark_failed(spec.req_id, spec.generation)
                failed = spec.generation
            if failed is not None and spec.generation <= failed:
                log.warning("%s: not storing tokens [%d, %d), computed over a failed load", spec.req_id,
                            spec.start, spec.end)  # fmt: skip
                continue
            if failed is not None:  # a recompute planned after vLLM rolled the request back
                del self._failed[spec.req_id]
            try:
                stored = self._save(spec)
            except Exception:  # a failed store is a future miss, never an engine error
                log.exception("storing %s tokens [%d, %d) failed", spec.req_id, spec.start, spec.end)
                continue
            self.stored_tokens += stored
            if stored:
                log.info("%s: stored %d new tokens of [%d, %d)", spec.req_id, stored, spec.start, spec.end)

    def _save(self, spec: StoreSpec) -> int:
        paged = self._paged()
        ids = torch.tensor(spec.block_ids, dtype=torch.long)

        def gather(lo: int, hi: int) -> torch.Tensor:
            return compact(paged.gather(ids, lo, hi).to("cpu"))  # a partial last block was gathered whole

        return self.engine.store_chunks(spec.tokens, gather, spec.start, spec.end, spec.salt)

    def forget(self, req_ids: set[str]) -> None:
        """Drop what is kept about finished requests."""
        for req_id in req_ids:
            self._failed.pop(req_id, None)

    def take_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _paged(self) -> PagedKV:
        if self.paged is None:
            raise LayoutError("the connector has no KV caches registered yet")
        return self.paged
