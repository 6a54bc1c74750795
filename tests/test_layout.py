"""KVLayout: shapes, sizes, fingerprints and the errors for mismatched tensors."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout, dtype_code, dtype_from_code


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
