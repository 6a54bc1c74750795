"""Check, at start-up, that vLLM's CPU attention kernel lays out KV blocks as kvtier's "cpu" layout reads them.

Inside a block, vLLM's CPU backend keeps K and V in whatever order its attention kernel (picked
per CPU feature set, dtype and block size) wants: the `vec` and `vec16` kernels write K as
`[head_dim, block_size]` and V as `[block_size, head_dim]`. A whole-block copy out and back is
bit-exact under any reading, so a wrong reading would only show where it matters: another engine
(transformers, vLLM on a GPU or another CPU kernel) loading those chunks, a lossy codec, a partial
block. So the connector writes known values through vLLM's own cache-write op into two scratch
blocks and requires kvtier's reading of them to give those values back.
"""

from __future__ import annotations

import logging

import torch

from kvtier.adapters.paged import PagedKV
from kvtier.errors import LayoutError
from kvtier.layout import KVLayout

log = logging.getLogger("kvtier.vllm")


def check_cpu_layout(layout: KVLayout, block_size: int, model_dtype: torch.dtype | None = None,
                     cache_dtype: str = "auto") -> None:  # fmt: skip
    """Raise LayoutError if vLLM's CPU kernel for this model dtype, KV cache dtype ("auto" or an
    fp8 one; `layout.dtype` is what the cache holds), head size and block size stores a block
    differently from kvtier's "cpu" layout; log a warning if it cannot be checked."""
    model_dtype = layout.dtype if model_dtype is None else model_dtype
    heads, dim, tokens = layout.num_kv_heads, layout.head_dim, 2 * block_size
    # vLLM allocates fp8 caches as bytes; its op quantizes what it writes (scale 1 here)
    cache = torch.zeros(
        2, heads, block_size, 2 * dim, dtype=torch.uint8 if layout.dtype.itemsize == 1 else layout.dtype
    )
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(model_dtype, block_size, dim, cache_dtype)
        key_cache, value_cache = cache.view(2, heads, 2 * block_size, dim).chunk(2, dim=2)
        gen = torch.Generator().manual_seed(0)
        # small integers: exact in every float dtype down to fp8 e5m2, and distinct enough to
        # expose any permutation of a block's 2 x 64+ values per head
        k, v = (torch.randint(-8, 9, (tokens, heads, dim), generator=gen).to(model_dtype) for _ in range(2))
        ops.cpu_attn_reshape_and_cache(k.clone(), v.clone(), key_cache, value_cache, torch.arange(tokens), isa,
                                       kv_cache_dtype=cache_dtype)  # fmt: skip
    except (ImportError, AttributeError, RuntimeError, TypeError, NotImplementedError) as exc:  # nothing to check with
        log.warning("could not check vLLM's CPU KV block layout (%s); assuming kvtier's 'cpu' layout", exc)
        return
    one_layer = KVLayout(1, layout.num_kv_heads, layout.head_dim, layout.dtype)
    got = PagedKV("cpu", one_layer, [as_layout_dtype(cache, layout.dtype)], block_size).gather(
        torch.tensor([0, 1]), 0, tokens
    )
    if not (torch.equal(got[0, 0].float(), k.float()) and torch.equal(got[1, 0].float(), v.float())):
        raise LayoutError(
            f"vLLM's CPU attention kernel {isa!r} ({model_dtype}, KV cache {cache_dtype}, head size {dim}, block "
            f"size {block_size}) stores KV blocks in an order kvtier does not know; kvtier cannot run with it"
        )
    log.debug("vLLM's CPU KV block layout (kernel %r) matches kvtier's 'cpu' layout", isa)


def as_layout_dtype(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`cache` viewed as `dtype` where vLLM allocates it as bytes (fp8 KV caches); else itself."""
    if cache.dtype == torch.uint8 and dtype != torch.uint8 and dtype.itemsize == 1:
        return cache.view(dtype)
    return cache
