"""Learn, at start-up, how vLLM's CPU attention kernel lays out K and V inside a block.

Inside a block, vLLM's CPU backend keeps each head's K and V in whatever order the attention
kernel it picked (per CPU feature set, dtype and block size) wants: `vec` and `vec16` write K as
`[head_dim, block_size]` and V as rows; `amx` writes 16-bit KV as AMX tiles with VNNI pairs (K
`[block_size / 16, head_dim / 2, 16, 2]`, V `[head_dim / 16, block_size / 2, 16, 2]`), and fp32
in tiles of 16 (K `[block_size / 16, head_dim, 16]`, V `[head_dim / 16, block_size, 16]`). A
whole-block copy out and back is bit-exact under any reading, so a wrong reading would only show
where it matters: another engine (transformers, vLLM on a GPU or with another kernel) loading those
chunks, a lossy codec, a partial block.

So instead of coding each kernel's order by hand, the connector asks vLLM's own cache-write op
(`cpu_attn_reshape_and_cache`, with the kernel vLLM will use) where each value goes: it writes one
block in a few passes, each value a base-8 digit of a unique id (plane, head, token, dim), small
integers exact in every KV dtype down to fp8, and reads the ids back from memory. Each plane's
`[block_size, head_dim] -> offset` table must then be one of the strided orders `BlockOrder`
describes (so copies stay strided runs); then a second write of random values must read back
exactly. The op only moves data, so it runs for any kernel on any x86 CPU: the `amx` order is
learned (and tested) on CPUs without AMX too.
"""

from __future__ import annotations

import logging
import math

import torch

from kvtier.adapters.paged import BlockOrder, PagedKV, vec_orders
from kvtier.errors import LayoutError
from kvtier.layout import KVLayout

log = logging.getLogger("kvtier.vllm")
BASE = 8  # digits 0..7: exact in fp32, fp16, bf16, fp8 e4m3 and e5m2
_SPLITS = (1, 2, 4, 8, 16, 32)  # pair sizes (t_lo, d_lo) tried when fitting an order


def kernel_isa(model_dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str) -> str:
    """The attention kernel vLLM's CPU backend picks for this model (its own choice function)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return str(_get_attn_isa(model_dtype, block_size, head_dim, cache_dtype))


def cpu_block_orders(
    layout: KVLayout, block_size: int, model_dtype: torch.dtype | None = None, cache_dtype: str = "auto",
    isa: str | None = None,
) -> tuple[BlockOrder, BlockOrder]:  # fmt: skip
    """The K and V orders of the kernel vLLM uses (or `isa`) for this layout, learned from its
    cache-write op and checked; the `vec` orders, with a warning, where the op cannot be run."""
    model_dtype = layout.dtype if model_dtype is None else model_dtype
    try:
        from vllm import _custom_ops  # noqa: F401  (the op is there)

        isa = isa or kernel_isa(model_dtype, block_size, layout.head_dim, cache_dtype)
        orders = learn_orders(isa, layout, block_size, model_dtype, cache_dtype)
    except (ImportError, AttributeError, RuntimeError, TypeError, NotImplementedError) as exc:  # nothing to learn with
        log.warning("could not learn vLLM's CPU KV block layout (%s); assuming its 'vec' kernel's", exc)
        return vec_orders(block_size, layout.head_dim)
    check_orders(orders, isa, layout, block_size, model_dtype, cache_dtype)
    log.info("vLLM's CPU kernel %r keeps K as %s and V as %s", isa, *orders)
    return orders


def _write(isa: str, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, block_size: int, cache_dtype: str) -> None:
    """vLLM's cache write of tokens 0..n-1 (`k`, `v`: `[n, heads, dim]`) into blocks of `cache`."""
    from vllm import _custom_ops as ops

    blocks, heads, _, width = cache.shape
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, width // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.clone(), v.clone(), key_cache, value_cache, torch.arange(k.shape[0]), isa,
                                   kv_cache_dtype=cache_dtype)  # fmt: skip


def _scratch(layout: KVLayout, block_size: int, blocks: int) -> torch.Tensor:
    """Zeroed CPU cache blocks as vLLM allocates them (fp8 caches as bytes)."""
    dtype = torch.uint8 if layout.dtype.itemsize == 1 else layout.dtype
    return torch.zeros(blocks, layout.num_kv_heads, block_size, 2 * layout.head_dim, dtype=dtype)


def _values(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return as_layout_dtype(cache, dtype).float().round().long()


def learn_orders(
    isa: str, layout: KVLayout, block_size: int, model_dtype: torch.dtype, cache_dtype: str
) -> tuple[BlockOrder, BlockOrder]:
    """Where vLLM's `isa` kernel writes each (plane, head, token, dim) of one block; LayoutError if
    a plane's order is not a `BlockOrder` or values leave their (plane, head) region."""
    heads, dim = layout.num_kv_heads, layout.head_dim
    shape = (2, heads, block_size, dim)  # plane, head, token, dim
    ids = torch.arange(math.prod(shape)).view(shape)
    found = torch.zeros(heads, 2 * block_size * dim, dtype=torch.long)  # the id each element holds
    for p in range(max(1, math.ceil(math.log(ids.numel(), BASE)))):
        digits = (ids // BASE**p) % BASE  # [plane, head, token, dim]
        cache = _scratch(layout, block_size, 1)
        k, v = (digits[plane].transpose(0, 1).to(model_dtype) for plane in range(2))  # [tokens, heads, dim]
        _write(isa, k, v, cache, block_size, cache_dtype)
        found += _values(cache, layout.dtype).view(heads, -1) * BASE**p
    region = block_size * dim
    orders = []
    for plane in range(2):
        table = torch.full((block_size, dim), -1, dtype=torch.long)
        for head in range(heads):
            held = found[head, plane * region : (plane + 1) * region]
            if not torch.equal(held.sort().values, ids[plane, head].flatten()):
                raise LayoutError(f"vLLM's CPU kernel {isa!r} writes plane {plane}, head {head} outside its region")
            offsets = torch.empty(region, dtype=torch.long)
            offsets[held - ids[plane, head, 0, 0]] = torch.arange(region)  # [token * dim + d] -> offset
            offsets = offsets.view(block_size, dim)
            if head and not torch.equal(offsets, table):
                raise LayoutError(f"vLLM's CPU kernel {isa!r} orders heads 0 and {head} differently")
            table = offsets
        order = fit_order(table)
        if order is None:
            raise LayoutError(
                f"vLLM's CPU attention kernel {isa!r} ({model_dtype}, KV cache {cache_dtype}, head size {dim}, "
                f"block size {block_size}) keeps {'KV'[plane]} in an order that is not a strided view; kvtier "
                "cannot run with it"
            )
        orders.append(order)
    return orders[0], orders[1]


def fit_order(table: torch.Tensor) -> BlockOrder | None:
    """The BlockOrder that gives `table` (`[block_size, head_dim]` offsets), the smallest pairs first;
    None if none does."""
    tokens, dim = table.shape
    for t_lo in (s for s in _SPLITS if tokens % s == 0):
        for d_lo in (s for s in _SPLITS if dim % s == 0):
            base = int(table[0, 0])
            order = BlockOrder(
                t_lo, d_lo,
                t_hi=int(table[t_lo, 0]) - base if t_lo < tokens else 1,
                t_step=int(table[1, 0]) - base if t_lo > 1 else 1,
                d_hi=int(table[0, d_lo]) - base if d_lo < dim else 1,
                d_step=int(table[0, 1]) - base if d_lo > 1 else 1,
                base=base,
            )  # fmt: skip
            if torch.equal(order.offsets(tokens, dim), table):
                return order
    return None


def check_orders(
    orders: tuple[BlockOrder, BlockOrder], isa: str, layout: KVLayout, block_size: int, model_dtype: torch.dtype,
    cache_dtype: str,
) -> None:  # fmt: skip
    """Write random small integers with vLLM's op into two blocks (a partial second one) and require
    a gather through `orders` to return them exactly; LayoutError if it does not."""
    tokens = block_size + block_size // 2 + 1
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randint(-8, 9, (tokens, layout.num_kv_heads, layout.head_dim), generator=gen).to(model_dtype)
            for _ in range(2))  # fmt: skip
    cache = _scratch(layout, block_size, 2)
    _write(isa, k, v, cache, block_size, cache_dtype)
    one_layer = KVLayout(1, layout.num_kv_heads, layout.head_dim, layout.dtype)
    paged = PagedKV("cpu", one_layer, [as_layout_dtype(cache, layout.dtype)], block_size, orders)
    got = paged.gather(torch.tensor([0, 1]), 0, tokens)
    if not (torch.equal(got[0, 0].float(), k.float()) and torch.equal(got[1, 0].float(), v.float())):
        raise LayoutError(f"vLLM's CPU kernel {isa!r}: reading its blocks as {orders} does not give back what it wrote")


def as_layout_dtype(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`cache` viewed as `dtype` where vLLM allocates it as bytes (fp8 KV caches); else itself."""
    if cache.dtype == torch.uint8 and dtype != torch.uint8 and dtype.itemsize == 1:
        return cache.view(dtype)
    return cache
