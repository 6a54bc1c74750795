"""KVLayout: shapes, sizes, fingerprints and the errors for mismatched tensors."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout, compact, dtype_code, dtype_from_code, is_head_major


def test_smollm2_chunk_is_5_9_mb():
    layout = KVLayout(30, 3, 64, torch.bfloat16)
    assert layout.shape(256) == (2, 30, 256, 3, 64)
    assert layout.bytes_per_token * 256 == 5_898_240


def test_mla_layout():
    layout = KVLayout(4, 1, 576, torch.bfloat16, mla=True)
    assert layout.shape(8) == (1, 4, 8, 1, 576)
    with pytest.raises(LayoutError, match=r"MLA"):
        KVLayout(4, 2, 576, mla=True)


def test_fingerprint_separates_layouts():
    prints = {
        KVLayout(30, 3, 64, torch.bfloat16).fingerprint,
        KVLayout(30, 3, 64, torch.float16).fingerprint,
        KVLayout(30, 3, 128, torch.bfloat16).fingerprint,
        KVLayout(30, 1, 64, torch.bfloat16, mla=True).fingerprint,
        KVLayout(29, 3, 64, torch.bfloat16).fingerprint,
    }
    assert len(prints) == 5
    assert KVLayout(30, 3, 64, "bfloat16").fingerprint == KVLayout(30, 3, 64, torch.bfloat16).fingerprint


def test_check_rejects_wrong_shape_and_dtype():
    layout = KVLayout(2, 2, 8, torch.float32)
    layout.check(torch.zeros(2, 2, 5, 2, 8))
    with pytest.raises(LayoutError, match=r"dtype torch.float16 does not match"):
        layout.check(torch.zeros(2, 2, 5, 2, 8, dtype=torch.float16))
    with pytest.raises(LayoutError, match=r"shape \(2, 3, 5, 2, 8\) does not match"):
        layout.check(torch.zeros(2, 3, 5, 2, 8))
    with pytest.raises(LayoutError, match=r"shape"):
        layout.check(torch.zeros(2, 2, 5, 2))
    with pytest.raises(LayoutError, match=r"shape"):
        layout.check(torch.zeros(2, 2, 5, 2, 8), num_tokens=4)
    with pytest.raises(LayoutError, match=r"torch.Tensor"):
        layout.check([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_dimensions(bad):
    with pytest.raises(LayoutError, match=r"positive int"):
        KVLayout(bad, 2, 8)


def test_dtype_codes_round_trip():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        assert dtype_from_code(dtype_code(dtype)) == dtype
    with pytest.raises(LayoutError):
        KVLayout(2, 2, 8, torch.complex64)
    with pytest.raises(LayoutError):
        dtype_from_code(99)


def test_head_major_chunks_keep_the_canonical_shape():
    layout = KVLayout(num_layers=3, num_kv_heads=4, head_dim=8, dtype=torch.float32)
    kv = layout.empty(5, head_major=True)
    assert kv.shape == layout.shape(5) and is_head_major(kv) and not kv.is_contiguous()
    assert kv.transpose(2, 3).is_contiguous()  # [planes, layers, heads, tokens, dim] underneath
    assert not is_head_major(layout.empty(5))
    # one head or one token: both orders are the same memory, and the chunk counts as token-major
    assert not is_head_major(KVLayout(3, 1, 8, torch.float32).empty(5, head_major=True))
    assert not is_head_major(layout.empty(1, head_major=True))


def test_compact_copies_only_what_is_not_contiguous_in_either_order():
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=4, dtype=torch.float32)
    whole = layout.empty(8, head_major=True).copy_(torch.randn(layout.shape(8)))
    assert compact(whole) is whole
    token_major = whole.contiguous()
    assert compact(token_major) is token_major
    part = whole[:, :, :5]  # a head-major chunk cut short: neither order is contiguous
    assert not part.is_contiguous() and not is_head_major(part)
    for order, out in ((True, compact(part)), (True, compact(part, True)), (False, compact(part, False))):
        assert torch.equal(out, part) and out.data_ptr() != part.data_ptr()
        assert is_head_major(out) if order else out.is_contiguous()
    assert compact(token_major[:, :, :5]).is_contiguous()  # None follows the strides it is given
