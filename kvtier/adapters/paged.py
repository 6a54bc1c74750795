"""Paged KV memory (vLLM) <-> canonical chunk tensors.

vLLM keeps each layer's KV in fixed-size blocks; a request's tokens live in the blocks its block
table lists, in order. Every supported layout is first seen through a *block view*: a strided view
(no copy) of one layer as `[num_blocks, planes, block_size, kv_heads, head_dim]`. Gathering and
scattering are then written once: per layer, one strided slice copy per run of consecutive blocks
(vLLM often hands out consecutive blocks), or one indexed copy when the blocks are scattered
(indexed copies run at about half the speed of slice copies on a CPU).

Layouts (per layer):
- ``cpu``:        `(num_blocks, kv_heads, block_size, 2 * head_dim)` (vLLM's CPU backend), whose memory
                  reads as `(num_blocks, kv_heads, 2, block_size, head_dim)`: per block and head, the
                  block's K rows, then its V rows.
- ``flash_nhd``:  `[2, num_blocks, block_size, kv_heads, head_dim]` (FlashAttention)
- ``flash_hnd``:  `[2, num_blocks, kv_heads, block_size, head_dim]`
- ``flashinfer``: `[num_blocks, 2, block_size, kv_heads, head_dim]`
- ``mla``:        `[num_blocks, block_size, latent_dim]` (one latent per token; canonical planes = 1)
All are plain torch ops, so they run on any device. `gather` returns head-major chunks (see
kvtier.layout) for the layouts that keep each head's tokens of a block together (``cpu``,
``flash_hnd``), so that both directions copy whole `block_size x head_dim` runs; token-major for
the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout

BlockView = Callable[[torch.Tensor, KVLayout, int], torch.Tensor]


def _cpu(cache: torch.Tensor, layout: KVLayout, block_size: int) -> torch.Tensor:
    blocks = cache.shape[0]
    view = cache.view(blocks, layout.num_kv_heads, 2, block_size, layout.head_dim)
    return view.permute(0, 2, 3, 1, 4)


def _flash_nhd(cache: torch.Tensor, layout: KVLayout, block_size: int) -> torch.Tensor:
    return cache.permute(1, 0, 2, 3, 4)


def _flash_hnd(cache: torch.Tensor, layout: KVLayout, block_size: int) -> torch.Tensor:
    return cache.permute(1, 0, 3, 2, 4)


def _flashinfer(cache: torch.Tensor, layout: KVLayout, block_size: int) -> torch.Tensor:
    return cache


def _mla(cache: torch.Tensor, layout: KVLayout, block_size: int) -> torch.Tensor:
    return cache.unsqueeze(1).unsqueeze(3)


# layouts whose blocks hold each head's tokens contiguously: their chunks are gathered head-major
HEAD_MAJOR_KINDS = frozenset({"cpu", "flash_hnd"})

BLOCK_VIEWS: dict[str, BlockView] = {
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
        if kind not in BLOCK_VIEWS:
            raise LayoutError(f"unknown paged layout {kind!r}; supported: {', '.join(BLOCK_VIEWS)}")
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
        self.views = [BLOCK_VIEWS[kind](cache, layout, block_size) for cache in caches]
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
        runs = block_runs(ids)
        # [layers, blocks, planes, block_size, h, d]
        blocks = out.unflatten(2, (len(ids), self.block_size)).permute(1, 2, 0, 3, 4, 5)
        if runs is None:  # scattered: one indexed copy per layer
            dev_ids = ids.to(self.device)
            for layer, view in enumerate(self.views):
                blocks[layer].copy_(view.index_select(0, dev_ids))
        else:  # consecutive blocks: one batched copy over every layer per run
            for offset, first, length in runs:
                _copy_all(list(blocks[:, offset : offset + length].unbind(0)),
                          [view[first : first + length] for view in self.views])  # fmt: skip
        return out[:, :, : end - start]

    def scatter(self, block_ids: torch.Tensor, start: int, kv: torch.Tensor) -> None:
        """Write canonical `kv` into the request's blocks for tokens [start, start + kv.shape[2])."""
        self.layout.check(kv)
        end = start + kv.shape[2]
        ids, tail = self._blocks(block_ids, start, end)
        kv = kv.to(self.device, non_blocking=True)
        full = len(ids) - (tail < self.block_size)
        runs = block_runs(ids[:full])
        dev_ids = ids[:full].to(self.device) if runs is None else ids
        bs = self.block_size
        if full:
            # [layers, blocks, planes, block_size, h, d]: one view per layer, sliced per run
            blocks = kv[:, :, : full * bs].unflatten(2, (full, bs)).permute(1, 2, 0, 3, 4, 5)
            if runs is None:
                for layer, view in enumerate(self.views):
                    view.index_copy_(0, dev_ids, blocks[layer])
            else:
                for offset, first, length in runs:  # one batched copy over every layer per run
                    _copy_all([view[first : first + length] for view in self.views],
                              blocks[:, offset : offset + length].unbind(0))  # fmt: skip
        if tail < bs:
            last = int(ids[full])
            for layer, view in enumerate(self.views):
                view[last, :, :tail] = kv[:, layer, full * bs :]


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
