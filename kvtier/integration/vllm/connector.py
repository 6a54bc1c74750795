"""KVTierConnector: vLLM's KVConnectorBase_V1 over a kvtier CacheEngine.

A thin facade: the scheduler role delegates to `Planner` (bookkeeping only), the worker role to
`Worker` (tensor moves). Load it with

    KVTransferConfig(kv_connector="KVTierConnector",
                     kv_connector_module_path="kvtier.integration.vllm", kv_role="kv_both")

Loads are synchronous in `start_load_kv` (before the forward pass); stores happen in
`wait_for_save`, after the forward pass, for chunks whose every token has been computed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.cluster.holdings import address as holdings_address
from kvtier.integration.vllm.lookup import SchedulerLookup
from kvtier.integration.vllm.plan import Planner, StepPlan
from kvtier.integration.vllm.setup import acquire_node, release_node, scheduler_lookup, settings_from
from kvtier.integration.vllm.worker import Worker

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvtier.vllm")


@dataclass
class KVTierMetadata(KVConnectorMetadata):
    """One step's plan, sent from the scheduler to the workers."""

    plan: StepPlan = field(default_factory=StepPlan)


class KVTierConnector(KVConnectorBase_V1):
    """Reuses KV across requests and vLLM instances through kvtier's tiers."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = settings_from(vllm_config)
        config = self._settings.config
        rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        self._node = acquire_node(self._settings, rank, services=role == KVConnectorRole.WORKER)
        self._engine = self._node.engine
        engine_id = str(self._kv_transfer_config.engine_id)
        self._lookup: SchedulerLookup | None = None
        self._planner: Planner | None = None
        self._worker: Worker | None = None
        self._requests: dict[str, Any] = {}
        if role == KVConnectorRole.SCHEDULER:
            _recompute_failed_loads(self._kv_transfer_config)
            self._lookup = scheduler_lookup(self._node, engine_id)
            self._planner = Planner(self._lookup, self._settings.block_size, config.chunk_size,
                                    config.save_partial_chunks, self._settings.save_decode_tokens,
                                    self._settings.load_partial_blocks)  # fmt: skip
        else:
            settings = self._settings
            self._node.publish_holdings(holdings_address(engine_id, rank))
            self._worker = Worker(self._engine, settings.block_size, _tp_agreement(settings.world_size),
                                  settings.model_dtype, settings.cache_dtype)  # fmt: skip
        log.info("kvtier connector (%s, pid %d, rank %d) for %s: chunk %d, block %d; %s", role.name, os.getpid(),
                 rank, self._settings.model_id, config.chunk_size, self._settings.block_size,
                 self._node.describe())  # fmt: skip

    # --- scheduler side ----------------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a store lost to a preemption is a future miss (vLLM >= 0.32)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._planner is not None
        tokens = request.prompt_token_ids or []
        if not tokens or not keyed_by_tokens(request):
            return 0, False
        return self._planner.matched_tokens(
            request.request_id, tokens, num_computed_tokens, request_salt(request)
        ), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._planner is not None
        if not keyed_by_tokens(request):
            return  # never planned: nothing of it is loaded or stored
        prompt_len = len(request.prompt_token_ids or [])
        self._requests[request.request_id] = request
        self._planner.on_alloc(request.request_id, lambda: request.all_token_ids, prompt_len, num_external_tokens,
                               request_salt(request))  # fmt: skip

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._planner is not None
        plan = StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            step = self._planner.schedule(new.req_id, new.block_ids[0], True, new.num_computed_tokens,
                                          scheduled.get(new.req_id, 0))  # fmt: skip
            _extend(plan, step)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            step = self._planner.schedule(req_id, new_ids[0] if new_ids else None, req_id in cached.resumed_req_ids,
                                          cached.num_computed_tokens[i], scheduled.get(req_id, 0))  # fmt: skip
            _extend(plan, step)
        return KVTierMetadata(plan)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._planner is not None:
            self._planner.finished(request.request_id)
        self._requests.pop(request.request_id, None)
        return False, None  # stores finish inside the step, so the blocks can be freed now

    # --- worker side -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks are stored in wait_for_save, once every layer is computed

    def wait_for_save(self) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.save(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is not None:
            self._worker.forget(finished_req_ids)
        return None, None  # loads and stores complete inside their step

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
        release_node(self._node)

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierMetadata)
        return meta.plan


def keyed_by_tokens(request: Any) -> bool:
    """Whether kvtier can key a request's KV: by its token ids and `request_salt`. Not with images
    or audio (their placeholder tokens are alike for any input) or prompt embeddings: such
    requests are neither looked up nor stored."""
    return getattr(request, "prompt_embeds", None) is None and not getattr(request, "mm_features", None)


def request_salt(request: Any) -> str | None:
    """What besides its tokens decides a request's KV, as vLLM's own prefix cache keys it: its
    `cache_salt` (per-tenant isolation) and its LoRA adapter (name and path). Requests with
    different salts never share chunks; None when there is neither."""
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora={lora.lora_name}\0{lora.lora_path}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"cache_salt={salt}")
    return "\0".join(parts) or None


def _recompute_failed_loads(kv_transfer_config: Any) -> None:
    """A cache miss discovered while loading must cost a recompute, never a failed request.

    vLLM reads this policy after creating the scheduler's connector, and defaults it to "fail".
    """
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
        log.warning(
            "kvtier sets kv_load_failure_policy='recompute' (was %r): blocks whose KV cannot be loaded "
            "are recomputed; pass it in --kv-transfer-config to silence this warning",
            kv_transfer_config.kv_load_failure_policy,
        )
        kv_transfer_config.kv_load_failure_policy = "recompute"


def _tp_agreement(world_size: int) -> Callable[[torch.Tensor], None] | None:
    """With tensor parallelism: max-reduce a worker's per-load failure flags over the TP group."""
    if world_size <= 1:
        return None
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group().cpu_group

    def agree(flags: torch.Tensor) -> None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)

    return agree


def _extend(plan: StepPlan, step: StepPlan) -> None:
    plan.loads.extend(step.loads)
    plan.stores.extend(step.stores)
