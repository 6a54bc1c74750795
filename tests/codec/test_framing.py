"""Stored-object framing: exact round trips, and every single-byte corruption is rejected."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from kvtier.codec.framing import HEADER_SIZE, decode_object, encode_object, layout_tag, parse_header
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


def test_objects_of_the_raw_only_format_still_read():
    """The first format had 36 zero bytes before the header checksum; codec parameters took 16."""
    kv = random_kv(LAYOUT, 3)
    payload = kv.numpy().tobytes()
    old = struct.Struct("<4sHHHBB5IIQ8s16s16s16s")
    body = old.pack(
        b"KVTR", 1, 1, 0, 1, 5, *kv.shape, 3, len(payload), layout_tag(LAYOUT), key(1).namespace, key(1).digest,
        xxhash.xxh3_128_digest(payload),
    ).ljust(HEADER_SIZE - 8, b"\0")  # fmt: skip
    data = bytearray(body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + payload)
    assert data == frame(kv)  # raw objects are byte for byte what they were
    assert torch.equal(decode_object(data, key(1), LAYOUT, RawCodec()), kv)


def test_head_major_objects_are_version_2_and_no_other_version_reads():
    layout = KVLayout(3, 2, 8, torch.float32)
    kv = random_kv(layout, 6)
    head_major = layout.empty(6, head_major=True).copy_(kv)
    data = frame(head_major, layout=layout)
    assert parse_header(data).version == 2 and parse_header(frame(kv, layout=layout)).version == 1
    assert torch.equal(decode_object(data, key(1), layout, RawCodec()), kv)
    for version in (0, 3, 0xFFFF):  # a valid header checksum over an unknown version
        data[4:6] = struct.pack("<H", version)
        data[HEADER_SIZE - 8 : HEADER_SIZE] = struct.pack(
            "<Q", xxhash.xxh3_64_intdigest(bytes(data[: HEADER_SIZE - 8]))
        )
        with pytest.raises(CorruptObjectError, match=f"unsupported format version {version}"):
            decode_object(data, key(1), layout, RawCodec())
