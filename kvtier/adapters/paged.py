"""Paged KV memory (vLLM) <-> canonical chunk tensors.

vLLM keeps each layer's KV in fixed-size blocks; a request's tokens live in the blocks its block
table lists, in order. Every supported layout is first seen through *plane views*: strided views
(no copy) of one layer's K and V (or MLA latent) memory, each `[num_blocks, block_size, kv_heads,
head_dim]`. Gathering and scattering are then written once: per layer and plane, one strided slice
copy per run of consecutive blocks (vLLM often hands out consecutive blocks), or one indexed copy
when the blocks are scattered (indexed copies run at about half the speed of slice copies on a CPU).

Layouts (per layer):
- ``cpu``:        `(num_blocks, kv_heads, block_size, 2 * head_dim)` (vLLM's CPU backend), whose memory
                  holds, per block and head, K as `[head_dim, block_size]` (one column per token: what
                  vLLM's CPU attention kernels write, checked against them when the connector starts),
                  then V as `[block_size, head_dim]`.
- ``flash_nhd``:  `[2, num_blocks, block_size, kv_heads, head_dim]` (FlashAttention)
- ``flash_hnd``:  `[2, num_blocks, kv_heads, block_size, head_dim]`
- ``flashinfer``: `[num_blocks, 2, block_size, kv_heads, head_dim]`
- ``mla``:        `[num_blocks, block_size, latent_dim]` (one latent per token; canonical planes = 1)
All are plain torch ops, so they run on any device. `gather` returns head-major chunks (see
kvtier.layout) for the layouts that keep each head's tokens of a block together (``cpu``'s V,
``flash_hnd``), so that those copies move whole `block_size x head_dim` runs; token-major for the
others. (``cpu``'s K is transposed by every copy, either way.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout

PlaneViews = Callable[[torch.Tensor, KVLayout, int], list[torch.Tensor]]


def _cpu(cache: torch.Tensor, layout: KVLayout, block_size: int) -> list[torch.Tensor]:
    blocks, heads, dim = cache.shape[0], layout.num_kv_heads, layout.head_dim
    halves = cache.view(blocks, heads, 2, block_size * dim)
    k = halves[:, :, 0].view(blocks, heads, dim, block_size).permute(0, 3, 1, 2)
    v = halves[:, :, 1].view(blocks, heads, block_size, dim).permute(0, 2, 1, 3)
    return [k, v]


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

    def __init__(self, kind: str, layout: KVLayout, caches: list[torch.Tensor], block_size: int) -> None:
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
        # [layer][plane] -> [num_blocks, block_size, kv_heads, head_dim]
        self.views = [PLANE_VIEWS[kind](cache, layout, block_size) for cache in caches]
        self.device = caches[0].device

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
                blocks[plane, layer].copy_(view.index_select(0, dev_ids))
        else:  # consecutive blocks: one batched copy over every layer and plane per run
            for offset, first, length in runs:
                dst = [blocks[plane, layer, offset : offset + length] for layer, plane, _ in self._planes()]
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
                    view.index_copy_(0, dev_ids, blocks[plane, layer])
            else:
                for offset, first, length in runs:  # one batched copy over every layer and plane per run
                    src = [blocks[plane, layer, offset : offset + length] for layer, plane, _ in self._planes()]
                    _copy_all([view[first : first + length] for _, _, view in self._planes()], src)
        if tail < bs:
            last = int(ids[full])
            for layer, plane, view in self._planes():
                view[last, :tail] = kv[plane, layer, full * bs :]

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
