"""Paged layouts: gather/scatter against a per-token reference, bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from kvtier.adapters.paged import HEAD_MAJOR_KINDS, PagedKV, block_runs, expected_shape
from kvtier.errors import LayoutError
from kvtier.layout import KVLayout, is_head_major

BS = 4
MHA = KVLayout(3, 2, 8, torch.bfloat16)
MLA = KVLayout(3, 1, 12, torch.bfloat16, mla=True)
KINDS = ["cpu", "flash_nhd", "flash_hnd", "flashinfer", "mla"]


def layout_for(kind):
    return MLA if kind == "mla" else MHA


def make_caches(kind, num_blocks=10, seed=0):
    layout = layout_for(kind)
    gen = torch.Generator().manual_seed(seed)
    shape = expected_shape(kind, layout, num_blocks, BS)
    return [torch.randn(shape, generator=gen).to(layout.dtype) for _ in range(layout.num_layers)]


def token_kv(kind, cache, block, offset, layout):
    """K and V ([h, d] each; V None for MLA) of one token, read straight from the layout's definition."""
    if kind == "cpu":
        h, d = layout.num_kv_heads, layout.head_dim
        raw = cache[block].view(h, 2, BS * d)  # per head: K as [d, BS] (a column per token), then V as [BS, d]
        return raw[:, 0].view(h, d, BS)[:, :, offset], raw[:, 1].view(h, BS, d)[:, offset]
    if kind == "flash_nhd":
        return cache[0, block, offset], cache[1, block, offset]
    if kind == "flash_hnd":
        return cache[0, block, :, offset], cache[1, block, :, offset]
    if kind == "flashinfer":
        return cache[block, 0, offset], cache[block, 1, offset]
    return cache[block, offset].unsqueeze(0), None


def reference_gather(kind, caches, block_ids, start, end):
    layout = layout_for(kind)
    out = torch.empty(layout.shape(end - start), dtype=layout.dtype)
    for layer, cache in enumerate(caches):
        for t in range(start, end):
            k, v = token_kv(kind, cache, int(block_ids[t // BS]), t % BS, layout)
            out[0, layer, t - start] = k
            if v is not None:
                out[1, layer, t - start] = v
    return out


# scattered blocks (indexed copies), one run of consecutive blocks, two runs (slice copies)
BLOCK_IDS = {"scattered": [7, 2, 9, 0, 5], "consecutive": [3, 4, 5, 6, 7], "two runs": [8, 9, 1, 2, 3]}
DST_IDS = {"scattered": [8, 6, 4, 2, 0], "consecutive": [5, 6, 7, 8, 9], "two runs": [0, 1, 2, 6, 7]}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("start", "end"), [(0, 16), (4, 11), (8, 9), (0, 3)])
@pytest.mark.parametrize("ids", list(BLOCK_IDS))
def test_gather_matches_the_layout_definition(kind, start, end, ids):
    caches = make_caches(kind)
    block_ids = torch.tensor(BLOCK_IDS[ids])
    paged = PagedKV(kind, layout_for(kind), caches, BS)
    got = paged.gather(block_ids, start, end)
    assert torch.equal(got, reference_gather(kind, caches, block_ids, start, end))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("start", "n"), [(0, 16), (4, 7), (8, 1), (0, 20)])
@pytest.mark.parametrize("ids", list(BLOCK_IDS))
def test_scatter_round_trip_touches_only_its_tokens(kind, start, n, ids):
    layout = layout_for(kind)
    source = make_caches(kind, seed=1)
    target = make_caches(kind, seed=2)
    before = [c.clone() for c in target]
    src_ids, dst_ids = torch.tensor(BLOCK_IDS[ids]), torch.tensor(DST_IDS[ids])
    kv = PagedKV(kind, layout, source, BS).gather(src_ids, start, start + n)
    dst = PagedKV(kind, layout, target, BS)
    dst.scatter(dst_ids, start, kv)
    assert torch.equal(dst.gather(dst_ids, start, start + n), kv)
    # every other token of the target is untouched
    other = torch.tensor([b for b in range(10) if b not in dst_ids.tolist()])
    check = PagedKV(kind, layout, before, BS)
    assert torch.equal(dst.gather(other, 0, len(other) * BS), check.gather(other, 0, len(other) * BS))
    written = {(int(dst_ids[t // BS]), t % BS) for t in range(start, start + n)}
    for b in dst_ids.tolist():
        for off in range(BS):
            if (b, off) not in written:
                pos = torch.tensor([b])
                assert torch.equal(dst.gather(pos, 0, BS)[:, :, off], check.gather(pos, 0, BS)[:, :, off]), (b, off)


def test_block_runs():
    assert block_runs(torch.tensor([4, 5, 6])) == [(0, 4, 3)]
    assert block_runs(torch.tensor([8, 9, 1, 2, 3])) == [(0, 8, 2), (2, 1, 3)]
    assert block_runs(torch.tensor([], dtype=torch.long)) == []
    assert block_runs(torch.tensor([7, 2, 9, 0, 5])) is None  # more runs than slice copies pay for


def test_bad_inputs():
    caches = make_caches("cpu")
    with pytest.raises(LayoutError, match="not the cpu layout"):
        PagedKV("cpu", KVLayout(3, 2, 16, torch.bfloat16), caches, BS)
    with pytest.raises(LayoutError, match="unknown paged layout"):
        PagedKV("paged", MHA, caches, BS)
    with pytest.raises(LayoutError, match="does not match an MHA"):
        PagedKV("mla", MHA, make_caches("mla"), BS)
    paged = PagedKV("cpu", MHA, caches, BS)
    with pytest.raises(LayoutError, match="not a multiple of the block size"):
        paged.gather(torch.tensor([1, 2]), 2, 6)
    with pytest.raises(LayoutError, match="the request has 2"):
        paged.gather(torch.tensor([1, 2]), 0, 12)
    with pytest.raises(LayoutError, match="dtype"):
        paged.scatter(torch.tensor([1, 2]), 0, torch.zeros(MHA.shape(8)))


@pytest.mark.parametrize("kind", KINDS)
def test_gather_order_follows_the_layout_and_scatter_takes_either(kind):
    layout = layout_for(kind)
    source = make_caches(kind, seed=3)
    ids = torch.tensor(BLOCK_IDS["two runs"])
    kv = PagedKV(kind, layout, source, BS).gather(ids, 0, 2 * BS)
    heads_apart = kind in HEAD_MAJOR_KINDS and layout.num_kv_heads > 1
    assert is_head_major(kv) == heads_apart and kv.is_contiguous() != heads_apart
    for order in (True, False):  # a chunk in the other order (another engine wrote it) scatters alike
        other = layout.empty(2 * BS, head_major=order).copy_(kv)
        target = PagedKV(kind, layout, make_caches(kind, seed=4), BS)
        target.scatter(torch.tensor(DST_IDS["two runs"]), 0, other)
        assert torch.equal(target.gather(torch.tensor(DST_IDS["two runs"]), 0, 2 * BS), kv)
