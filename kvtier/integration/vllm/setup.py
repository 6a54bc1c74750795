"""Building kvtier's config, layout and engine from a vLLM config, and sharing one engine per process.

When the scheduler and a worker run in one process (always with one worker per engine core),
both roles share the CacheEngine, so the scheduler's lookups see L1 too. A scheduler in another
process builds its own engine on the same config and sees what workers stored through the shared
tiers (the disk directory, later remote tiers).
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from kvtier.models import model_id_for

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
_engines: dict[tuple[Any, ...], tuple[CacheEngine, int]] = {}


def acquire_engine(settings: ConnectorSettings, rank: int) -> CacheEngine:
    """The process's CacheEngine for these settings and rank (created on first use)."""
    key = (settings.config, settings.layout, settings.model_id, rank, settings.world_size)
    with _lock:
        engine, users = _engines.get(key, (None, 0))
        if engine is None:
            engine = CacheEngine(settings.config, settings.layout, settings.model_id, rank=rank,
                                 world_size=settings.world_size)  # fmt: skip
            atexit.register(engine.close)  # finish pending disk writes even if vLLM never calls shutdown()
        _engines[key] = (engine, users + 1)
        return engine


def engines() -> list[CacheEngine]:
    """The engines this process's connectors use (for counters and tests)."""
    with _lock:
        return [engine for engine, _ in _engines.values()]


def release_engine(engine: CacheEngine) -> None:
    """Drop one user of `engine`; the last one flushes and closes it."""
    with _lock:
        for key, (held, users) in list(_engines.items()):
            if held is engine:
                if users > 1:
                    _engines[key] = (held, users - 1)
                    return
                del _engines[key]
                break
    engine.close()
