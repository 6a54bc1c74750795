"""Hugging Face transformers caches <-> canonical chunk tensors.

transformers keeps, per layer, K and V as `[batch, kv_heads, tokens, head_dim]`; the canonical chunk
is `[2, layers, tokens, kv_heads, head_dim]`. Chunks are scattered straight into per-layer buffers
that become the cache's own tensors (no intermediate full-size copy). Works with transformers 5.x
(`cache.layers[i].keys`) and 4.x (`cache.key_cache[i]`).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.engine import CacheEngine
from kvtier.layout import KVLayout


def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of one layer of a DynamicCache, each `[batch, kv_heads, tokens, head_dim]`."""
    if hasattr(cache, "layers"):
        entry = cache.layers[layer]
        return entry.keys, entry.values
    return cache.key_cache[layer], cache.value_cache[layer]


def new_cache(model: Any) -> Any:
    """An empty DynamicCache suited to `model`."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x takes no config
        return DynamicCache()


def install_layer(cache: Any, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Make `k` and `v` the cache's tensors for an empty `layer`, without copying where possible."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and layer < len(layers) and type(layers[layer]) is DynamicLayer:
        entry = layers[layer]
        entry.update(k[:, :, :0], v[:, :, :0])  # lets the layer initialise itself, whatever its version
        entry.keys, entry.values = k, v
    else:  # other layer types (sliding windows) and transformers 4.x keep their own bookkeeping
        cache.update(k, v, layer)


def load_prefix(model: Any, engine: CacheEngine, tokens: Any, num_tokens: int) -> tuple[Any, int]:
    """A DynamicCache with the cached KV of up to `num_tokens` leading tokens, and how many it holds."""
    layout = engine.layout
    shape = (1, layout.num_kv_heads, num_tokens, layout.head_dim)
    ks = [torch.empty(shape, dtype=layout.dtype, device=model.device) for _ in range(layout.num_layers)]
    vs = [torch.empty(shape, dtype=layout.dtype, device=model.device) for _ in range(layout.num_layers)]

    def scatter(lo: int, hi: int, kv: torch.Tensor) -> None:
        for layer in range(layout.num_layers):
            ks[layer][0, :, lo:hi].copy_(kv[0, layer].transpose(0, 1))
            vs[layer][0, :, lo:hi].copy_(kv[1, layer].transpose(0, 1))

    got = engine.retrieve_into(tokens, scatter, max_tokens=num_tokens, device=model.device)
    cache = new_cache(model)
    if got:
        for layer in range(layout.num_layers):
            install_layer(cache, layer, ks[layer][:, :, :got], vs[layer][:, :, :got])
    return cache, got


def gather_chunk(cache: Any, layout: KVLayout, start: int, end: int) -> torch.Tensor:
    """A fresh canonical CPU tensor of tokens [start, end) of batch row 0 of `cache` (head-major,
    like the cache: one contiguous copy per layer and plane)."""
    out = layout.empty(end - start, head_major=True)
    for layer in range(layout.num_layers):
        k, v = layer_kv(cache, layer)
        # [heads, tokens, dim] on both sides: a strided copy on the CPU; from a GPU, the source is
        # made contiguous there and lands with one device-to-host copy
        out[0, layer].transpose(0, 1).copy_(k[0, :, start:end])
        out[1, layer].transpose(0, 1).copy_(v[0, :, start:end])
    return out
