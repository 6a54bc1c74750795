"""Building kvtier's config, layout and node from a vLLM config, and sharing one node per process.

When the scheduler and a worker run in one process (always with one worker per engine core),
both roles share the node's CacheEngine, so the scheduler's lookups see L1 too. A scheduler in
another process builds its own engine on the same config and sees what workers stored through the
shared tiers (the disk directory, remote tiers).

Services (admin API and /metrics, cluster agent, peer server: kvtier.node) run where the chunks
are: in each worker rank, rank r on its own ports and instance id (`Node`). The scheduler's own
engine in another process starts none of them: it holds no chunks of its own and would bind the
same ports as rank 0. When the roles share a process, the node's services start with the worker.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.cluster.holdings import HoldingsMirror, address
from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.integration.vllm.lookup import SchedulerLookup
from kvtier.layout import KVLayout
from kvtier.logutil import STARTUP
from kvtier.models import model_id_for
from kvtier.node import Node
from kvtier.units import format_size

startup = logging.getLogger(STARTUP)
MIRROR_WAIT_S = 10.0  # how long the scheduler waits at start-up for every rank's published L1 keys

# kv_connector_extra_config keys that configure the connector itself, not the cache
CONNECTOR_OPTIONS = {"save_decode_tokens": False, "load_partial_blocks": True}
_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """What the connector needs to know, read once from the vLLM config."""

    config: Config
    layout: KVLayout
    model_id: str
    block_size: int
    world_size: int
    save_decode_tokens: bool
    load_partial_blocks: bool
    model_dtype: torch.dtype  # what the forward pass computes in
    cache_dtype: str  # vLLM's kv_cache_dtype ("auto": the model's dtype)


def settings_from(vllm_config: Any) -> ConnectorSettings:
    """Read kvtier settings from `kv_connector_extra_config` over `Config.load()`."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    options = {key: extra.pop(key, default) for key, default in CONNECTOR_OPTIONS.items()}
    for key, value in options.items():
        if not isinstance(value, bool):
            raise ConfigError(f"kv_connector_extra_config.{key} must be true or false, got {value!r}")
    config = Config.load().merged(extra, "kv_connector_extra_config")
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if int(getattr(parallel, "pipeline_parallel_size", 1)) > 1:
        # keys name the tensor-parallel rank only: two stages holding as many layers would share them
        raise ConfigError("KVTierConnector does not support pipeline parallelism yet (pipeline_parallel_size "
                          f"{parallel.pipeline_parallel_size}); use tensor parallelism")  # fmt: skip
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto" and cache_dtype not in _CACHE_DTYPES:
        raise ConfigError(f"kvtier does not support vLLM's kv_cache_dtype {cache_dtype!r}; supported: "
                          f"auto, {', '.join(_CACHE_DTYPES)}")  # fmt: skip
    dtype = model.dtype if cache_dtype == "auto" else _CACHE_DTYPES[cache_dtype]
    mla = bool(getattr(model, "use_mla", False))
    layout = KVLayout(
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=1 if mla else model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        dtype=dtype,
        mla=mla,
    )
    return ConnectorSettings(
        config=config,
        layout=layout,
        model_id=model_id_for(str(model.model)),
        block_size=int(vllm_config.cache_config.block_size),
        world_size=int(parallel.tensor_parallel_size),
        save_decode_tokens=options["save_decode_tokens"],
        load_partial_blocks=options["load_partial_blocks"],
        model_dtype=model.dtype,
        cache_dtype=cache_dtype,
    )


_lock = threading.Lock()
_nodes: dict[tuple[Any, ...], tuple[Node, int]] = {}


def acquire_node(settings: ConnectorSettings, rank: int, services: bool) -> Node:
    """The process's Node for these settings and rank (created on first use); `services`: a worker
    asks for the node's services, which start then if an earlier user (the scheduler) did not."""
    key = (settings.config, settings.layout, settings.model_id, rank, settings.world_size)
    with _lock:
        node, users = _nodes.get(key, (None, 0))
        if node is None:
            node = Node(settings.config, settings.layout, settings.model_id, rank=rank,
                        world_size=settings.world_size, services=False)  # fmt: skip
            atexit.register(node.close)  # finish pending disk writes even if vLLM never calls shutdown()
        if services:
            node.start_services()
        _nodes[key] = (node, users + 1)
        return node


def engines() -> list[CacheEngine]:
    """The engines this process's connectors use (for counters and tests)."""
    with _lock:
        return [node.engine for node, _ in _nodes.values()]


def release_node(node: Node) -> None:
    """Drop one user of `node`; the last one stops its services and flushes and closes its engine."""
    with _lock:
        for key, (held, users) in list(_nodes.items()):
            if held is node:
                if users > 1:
                    _nodes[key] = (held, users - 1)
                    return
                del _nodes[key]
                break
    node.close()


def scheduler_lookup(node: Node, engine_id: str, wait_s: float = MIRROR_WAIT_S) -> SchedulerLookup:
    """The scheduler's lookup over `node`'s engine and the worker ranks' published L1 keys; logs where
    the scheduler will find KV to reuse, and warns about a configuration where it can find none."""
    engine, config = node.engine, node.config
    mirror = None
    sources = []
    if config.l1.size:
        mirror = HoldingsMirror([address(engine_id, rank) for rank in range(engine.world_size)])
        if mirror.wait_connected(wait_s):
            sources.append(f"the workers' memory (L1 {format_size(config.l1.size)} per rank)")
        else:
            missing = [rank for rank, up in enumerate(mirror.connected) if not up]
            startup.warning("kvtier: the scheduler cannot see the memory tier of rank(s) %s after %.0f s (their "
                            "L1 keys are not published); it will count their chunks once they are", missing,
                            wait_s)  # fmt: skip
    if config.disk.path:
        sources.append(f"disk {config.disk.path} ({format_size(config.disk.size)})")
    if config.remote.url:
        sources.append(f"remote {engine.chain.lower[-1].name if engine.chain.lower else config.remote.url}")
    if not sources:
        startup.warning("kvtier: no tier is configured (l1.size 0, no disk.path, no remote.url): vLLM will reuse "
                        "nothing from kvtier")  # fmt: skip
    else:
        startup.info("kvtier: vLLM's scheduler reuses KV from %s; chunks of %d tokens, model %s, %d rank(s)",
                     ", ".join(sources), config.chunk_size, engine.model_id, engine.world_size)  # fmt: skip
    return SchedulerLookup(engine, mirror)
