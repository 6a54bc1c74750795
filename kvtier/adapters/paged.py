"""Paged KV memory (vLLM) <-> canonical chunk tensors.

vLLM keeps each layer's KV in fixed-size blocks; a request's tokens live in the blocks its block
table lists, in order. Every supported layout is first seen through *plane views*: strided views
(no copy) of one layer's K and V (or MLA latent) memory, each `[num_blocks, block_size, kv_heads,
head_dim]`. Gathering and scattering are then written once: per layer and plane, one strided slice
copy per run of consecutive blocks (vLLM often hands out consecutive blocks), or one indexed copy
when the blocks are scattered (indexed copies run at about half the speed of slice copies on a CPU).

Layouts (per layer):
- ``cpu``:        `(num_blocks, kv_heads, block_size, 2 * head_dim)` (vLLM's CPU backend), whose memory
                  holds, per block and head, K's `block_size x head_dim` values, then V's, each in the
                  order its attention kernel wants (a `BlockOrder` per plane). The `vec` and `vec16`
                  kernels keep K as `[head_dim, block_size]` (a column per token) and V as rows (the
                  default, `vec_orders`); `amx` keeps 16-bit KV in AMX tiles with VNNI pairs, K as
                  `[block_size / 16, head_dim / 2, 16, 2]` and V as `[head_dim / 16, block_size / 2,
                  16, 2]`. The vLLM connector learns the orders of the kernel vLLM picked at start-up,
                  from vLLM's own cache-write op (integration/vllm/cpu_check.py).
- ``flash_nhd``:  `[2, num_blocks, block_size, kv_heads, head_dim]` (FlashAttention)
- ``flash_hnd``:  `[2, num_blocks, kv_heads, block_size, head_dim]`
- ``flashinfer``: `[num_blocks, 2, block_size, kv_heads, head_dim]`
- ``mla``:        `[num_blocks, block_size, latent_dim]` (one latent per token; canonical planes = 1)
A plane view is `[num_blocks, block_size, kv_heads, head_dim]`, or six-dimensional, `[num_blocks,
block_size / t_lo, t_lo, kv_heads, head_dim / d_lo, d_lo]`, for orders that interleave pairs of
tokens or dims (t_lo, d_lo > 1), so that those are strided views too; every copy splits its
canonical side the same way (four dimensions copy faster: torch does not drop the size-1 ones).
All are plain torch ops, so they run on any device. `gather` returns head-major chunks (see
kvtier.layout) for the layouts that keep each head's tokens of a block together (``cpu``,
``flash_hnd``), so that those copies move whole `block_size x head_dim` runs of V; token-major for
the others. (``cpu``'s K is transposed by every copy, either way.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout

PlaneViews = Callable[[torch.Tensor, KVLayout, int], list[torch.Tensor]]


@dataclass(frozen=True, slots=True)
class BlockOrder:
    """Where one head's K (or V) values sit in their `block_size x head_dim` region of a CPU block:
    token t, dim d at `base + (t // t_lo) * t_hi + (t % t_lo) * t_step + (d // d_lo) * d_hi +
    (d % d_lo) * d_step` elements from the region's start."""

    t_lo: int
    d_lo: int
    t_hi: int
    t_step: int
    d_hi: int
    d_step: int
    base: int = 0

    @staticmethod
    def rows(block_size: int, head_dim: int) -> BlockOrder:
        """`[block_size, head_dim]`: a row per token."""
        return BlockOrder(1, 1, head_dim, 1, 1, 1)

    @staticmethod
    def columns(block_size: int, head_dim: int) -> BlockOrder:
        """`[head_dim, block_size]`: a column per token."""
        return BlockOrder(1, 1, 1, 1, block_size, 1)

    def offsets(self, block_size: int, head_dim: int) -> torch.Tensor:
        """The `[block_size, head_dim]` element offsets this order gives."""
        t = torch.arange(block_size).unsqueeze(1)
        d = torch.arange(head_dim).unsqueeze(0)
        return (self.base + (t // self.t_lo) * self.t_hi + (t % self.t_lo) * self.t_step
                + (d // self.d_lo) * self.d_hi + (d % self.d_lo) * self.d_step)  # fmt: skip


def vec_orders(block_size: int, head_dim: int) -> tuple[BlockOrder, BlockOrder]:
    """K and V orders of vLLM's `vec` and `vec16` CPU kernels (K columns, V rows)."""
    return BlockOrder.columns(block_size, head_dim), BlockOrder.rows(block_size, head_dim)


def _cpu_views(
    cache: torch.Tensor, layout: KVLayout, block_size: int, orders: Sequence[BlockOrder]
) -> list[torch.Tensor]:
    """Plane views of a CPU cache whose block regions hold K then V in `orders` (six-dimensional for
    an order with pairs, else four)."""
    blocks, heads, dim = cache.shape[0], layout.num_kv_heads, layout.head_dim
    if cache.stride(2) != 2 * dim or cache.stride(3) != 1:
        raise LayoutError(f"a CPU KV cache must be contiguous inside its blocks; strides {cache.stride()}")
    views = []
    for plane, o in enumerate(orders):
        offset = cache.storage_offset() + plane * block_size * dim + o.base
        if o.t_lo == o.d_lo == 1:  # four dimensions: torch copies them faster than six with two of size 1
            views.append(cache.as_strided((blocks, block_size, heads, dim),
                                          (cache.stride(0), o.t_hi, cache.stride(1), o.d_hi), offset))  # fmt: skip
            continue
        size = (blocks, block_size // o.t_lo, o.t_lo, heads, dim // o.d_lo, o.d_lo)
        stride = (cache.stride(0), o.t_hi, o.t_step, cache.stride(1), o.d_hi, o.d_step)
        views.append(cache.as_strided(size, stride, offset))
    return views


def _cpu(cache: torch.Tensor, layout: KVLayout, block_size: int) -> list[torch.Tensor]:
    return _cpu_views(cache, layout, block_size, vec_orders(block_size, layout.head_dim))


def _flash_nhd(cache: torch.Tensor, layout: KVLayout, block_size: int) -> list[torch.Tensor]:
    return list(cache.unbind(0))


def _flash_hnd(cache: torch.Tensor, layout: KVLayout, block_size: int) -> list[torch.Tensor]:
    return [plane.transpose(1, 2) for plane in cache.unbind(0)]


def _flashinfer(cache: torch.Tensor, layout: KVLayout, block_size: int) -> list[torch.Tensor]:
    return list(cache.unbind(1))


def _mla(cache: torch.Tensor, layout: KVLayout, block_size: int) -> list[torch.Tensor]:
    return [cache.unsqueeze(2)]


# layouts whose blocks hold each head's tokens contiguously: their chunks are gathered head-major
HEAD_MAJOR_KINDS = frozenset({"cpu", "flash_hnd"})

PLANE_VIEWS: dict[str, PlaneViews] = {
    "cpu": _cpu,
    "flash_nhd": _flash_nhd,
    "flash_hnd": _flash_hnd,
    "flashinfer": _flashinfer,
    "mla": _mla,
}


def expected_shape(kind: str, layout: KVLayout, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """The per-layer shape the engine allocates for `kind`."""
    h, d = layout.num_kv_heads, layout.head_dim
    shapes = {
        "cpu": (num_blocks, h, block_size, 2 * d),
        "flash_nhd": (2, num_blocks, block_size, h, d),
        "flash_hnd": (2, num_blocks, h, block_size, d),
        "flashinfer": (num_blocks, 2, block_size, h, d),
        "mla": (num_blocks, block_size, d),
    }
    return shapes[kind]


class PagedKV:
    """Gathers and scatters canonical KV for token ranges of one request's blocks."""

    def __init__(
        self,
        kind: str,
        layout: KVLayout,
        caches: list[torch.Tensor],
        block_size: int,
        orders: Sequence[BlockOrder] | None = None,
    ) -> None:
        """`orders`: for the ``cpu`` kind, the K and V orders inside its blocks (default `vec_orders`)."""
        if kind not in PLANE_VIEWS:
            raise LayoutError(f"unknown paged layout {kind!r}; supported: {', '.join(PLANE_VIEWS)}")
        if (kind == "mla") != layout.mla:
            raise LayoutError(f"paged layout {kind!r} does not match an {'MLA' if layout.mla else 'MHA'} KVLayout")
        if len(caches) != layout.num_layers:
            raise LayoutError(f"got {len(caches)} layer caches for a {layout.num_layers}-layer layout")
        self.kind = kind
        self.layout = layout
        self.block_size = block_size
        blocks = caches[0].shape[0 if kind in ("cpu", "flashinfer", "mla") else 1]
        want = expected_shape(kind, layout, blocks, block_size)
        for i, cache in enumerate(caches):
            if tuple(cache.shape) != want or cache.dtype != layout.dtype:
                raise LayoutError(
                    f"layer {i}: KV cache {tuple(cache.shape)} {cache.dtype} is not the {kind} layout "
                    f"{want} {layout.dtype}"
                )
        if orders is not None and kind != "cpu":
            raise LayoutError(f"block orders apply to the cpu layout, not {kind!r}")
        if kind == "cpu":
            orders = tuple(orders or vec_orders(block_size, layout.head_dim))
            for o in orders:
                if block_size % o.t_lo or layout.head_dim % o.d_lo:
                    raise LayoutError(f"{o} does not tile blocks of {block_size} tokens x {layout.head_dim} dims")
            self.views = [_cpu_views(cache, layout, block_size, orders) for cache in caches]
            self.splits = [(o.t_lo, o.d_lo) for o in orders]
        else:  # [layer][plane] -> [num_blocks, block_size, kv_heads, head_dim]
            self.views = [PLANE_VIEWS[kind](cache, layout, block_size) for cache in caches]
            self.splits = [(1, 1)] * len(self.views[0])
        self.device = caches[0].device

    def _split(self, x: torch.Tensor, plane: int) -> torch.Tensor:
        """`[..., block_size, heads, dim]` canonical blocks as `[..., block_size / t_lo, t_lo, heads,
        dim / d_lo, d_lo]`, the shape of the plane's views (a view: any strides split)."""
        t_lo, d_lo = self.splits[plane]
        if t_lo == d_lo == 1:  # the plane's views are four-dimensional
            return x
        return x.unflatten(-3, (x.shape[-3] // t_lo, t_lo)).unflatten(-1, (x.shape[-1] // d_lo, d_lo))

    def _blocks(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, int]:
        """Block ids (on the CPU) covering tokens [start, end) (start block-aligned), and tokens in
        the last block."""
        if start % self.block_size:
            raise LayoutError(f"token range starts at {start}, not a multiple of the block size {self.block_size}")
        first, last = start // self.block_size, -(-end // self.block_size)
        if last > len(block_ids):
            raise LayoutError(f"tokens [{start}, {end}) need {last} blocks; the request has {len(block_ids)}")
        return block_ids[first:last].cpu(), end - (last - 1) * self.block_size

    def gather(self, block_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Canonical KV (on this device) of the request's tokens [start, end)."""
        ids, _ = self._blocks(block_ids, start, end)
        n = len(ids) * self.block_size
        out = self.layout.empty(n, self.device, head_major=self.kind in HEAD_MAJOR_KINDS)
        blocks = out.unflatten(2, (len(ids), self.block_size))  # [planes, layers, blocks, block_size, h, d]
        runs = block_runs(ids)
        if runs is None:  # scattered: one indexed copy per layer and plane
            dev_ids = ids.to(self.device)
            for layer, plane, view in self._planes():
                self._split(blocks[plane, layer], plane).copy_(view.index_select(0, dev_ids))
        else:  # consecutive blocks: one batched copy over every layer and plane per run
            for offset, first, length in runs:
                dst = [self._split(blocks[plane, layer, offset : offset + length], plane)
                       for layer, plane, _ in self._planes()]  # fmt: skip
                _copy_all(dst, [view[first : first + length] for _, _, view in self._planes()])
        return out[:, :, : end - start]

    def scatter(self, block_ids: torch.Tensor, start: int, kv: torch.Tensor) -> None:
        """Write canonical `kv` into the request's blocks for tokens [start, start + kv.shape[2])."""
        self.layout.check(kv)
        end = start + kv.shape[2]
        ids, tail = self._blocks(block_ids, start, end)
        kv = kv.to(self.device, non_blocking=True)
        full = len(ids) - (tail < self.block_size)
        runs = block_runs(ids[:full])
        bs = self.block_size
        if full:
            blocks = kv[:, :, : full * bs].unflatten(2, (full, bs))  # [planes, layers, blocks, block_size, h, d]
            if runs is None:
                dev_ids = ids[:full].to(self.device)
                for layer, plane, view in self._planes():
                    view.index_copy_(0, dev_ids, self._split(blocks[plane, layer], plane))
            else:
                for offset, first, length in runs:  # one batched copy over every layer and plane per run
                    src = [self._split(blocks[plane, layer, offset : offset + length], plane)
                           for layer, plane, _ in self._planes()]  # fmt: skip
                    _copy_all([view[first : first + length] for _, _, view in self._planes()], src)
        if tail < bs:
            last = int(ids[full])
            for layer, plane, view in self._planes():
                self._write_head(view[last], plane, kv[plane, layer, full * bs :])

    def _write_head(self, block: torch.Tensor, plane: int, kv: torch.Tensor) -> None:
        """Write `kv` (`[tokens, heads, dim]`, fewer tokens than a block) into the first tokens of
        one block's plane view, leaving its other tokens as they are."""
        t_lo, _ = self.splits[plane]
        if kv.shape[0] % t_lo == 0:  # whole groups of t_lo tokens: a strided copy
            block[: kv.shape[0] // t_lo].copy_(self._split(kv, plane))
            return
        whole = torch.empty(self.block_size, *kv.shape[1:], dtype=kv.dtype, device=self.device)
        self._split(whole, plane).copy_(block)  # read the block, change its head, write it back
        whole[: kv.shape[0]] = kv
        block.copy_(self._split(whole, plane))

    def _planes(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(layer, plane, view) for every layer's K and V (or latent) view, in a fixed order."""
        for layer, planes in enumerate(self.views):
            for plane, view in enumerate(planes):
                yield layer, plane, view


def _copy_all(dst: list[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for every i, in one call where torch offers it (no Python per layer)."""
    if _FOREACH_COPY is not None:
        _FOREACH_COPY(dst, src)
        return
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


def block_runs(ids: torch.Tensor, max_runs: int = 4) -> list[tuple[int, int, int]] | None:
    """`ids` as runs of consecutive block ids: (offset in ids, first id, length); None if more than
    `max_runs` (then an indexed copy is faster than that many slice copies)."""
    runs: list[tuple[int, int, int]] = []
    offset = 0
    values = ids.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((offset, values[offset], i - offset))
            if len(runs) > max_runs:
                return None
            offset = i
    return runs
