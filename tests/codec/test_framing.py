"""Stored-object framing: exact round trips, and every single-byte corruption is rejected."""

from __future__ import annotations

import pytest
import torch

from kvtier.codec.framing import HEADER_SIZE, decode_object, encode_object, parse_header
from kvtier.codec.raw import RawCodec
from kvtier.errors import CorruptObjectError
from kvtier.layout import KVLayout
from tests.conftest import key, random_kv

LAYOUT = KVLayout(2, 1, 4, torch.float32)


def frame(kv, k=None, layout=LAYOUT):
    header, payload = encode_object(k or key(1), layout, RawCodec(), kv)
    return bytearray(header + payload.tobytes())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    layout = KVLayout(3, 2, 8, dtype)
    kv = random_kv(layout, 7)
    data = frame(kv, layout=layout)
    assert len(data) == HEADER_SIZE + kv.nbytes
    out = decode_object(data, key(1), layout, RawCodec())
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_every_single_byte_corruption_is_rejected():
    kv = random_kv(LAYOUT, 3)
    good = frame(kv)
    for i in range(len(good)):
        for flip in (0x01, 0x80):
            bad = bytearray(good)
            bad[i] ^= flip
            with pytest.raises(CorruptObjectError):
                decode_object(bad, key(1), LAYOUT, RawCodec())


def test_truncation_and_extension_are_rejected():
    good = frame(random_kv(LAYOUT, 3))
    for n in (0, 4, HEADER_SIZE - 1, HEADER_SIZE, len(good) - 1):
        with pytest.raises(CorruptObjectError):
            decode_object(good[:n], key(1), LAYOUT, RawCodec())
    with pytest.raises(CorruptObjectError):
        decode_object(good + b"\0", key(1), LAYOUT, RawCodec())


def test_object_of_another_key_or_layout_is_rejected():
    data = frame(random_kv(LAYOUT, 3))
    with pytest.raises(CorruptObjectError, match="expected"):
        decode_object(data, key(2), LAYOUT, RawCodec())
    other = KVLayout(2, 1, 4, torch.float16)
    with pytest.raises(CorruptObjectError, match="layout"):
        decode_object(data, key(1), other, RawCodec())


def test_header_fields():
    kv = random_kv(LAYOUT, 5)
    header = parse_header(frame(kv))
    assert header.shape == (2, 2, 5, 1, 4) and header.num_tokens == 5
    assert header.key == key(1) and header.payload_len == kv.nbytes and header.dtype == torch.float32
