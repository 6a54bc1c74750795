"""The stored-object framing: a fixed, checksummed header followed by the codec's payload.

Header (128 bytes, little-endian):
    magic b"KVTR" | format version u16 | codec id u16 | flags u16 | dtype code u8 | ndim u8 |
    shape 5 x u32 | num_tokens u32 | payload length u64 | layout fingerprint 8 bytes |
    namespace 16 bytes | chunk digest 16 bytes | payload xxh3-128 16 bytes | codec parameters 16 bytes |
    zero padding | header xxh3-64 u64 (the last 8 bytes, over the 120 before them)
The key is inside the header, so an object served for the wrong key is rejected too. The codec
parameters (bit widths, group sizes, scale axes: each codec documents its 16 bytes) sit in what was
zero padding in the first raw-only objects, so those still read: raw's parameters are all zeros
for token-major chunks (and name the memory order of head-major ones, see kvtier.layout).

Format version 2 marks an object whose parameters differ from its codec's own: a raw head-major
chunk, which readers from before codec parameters would take for a token-major one (they ignored
those bytes). Every kvtier reader checks the version, so those reject it as corrupt (a miss; the
tier deletes it) instead of returning wrong KV. Everything else is written as version 1, byte for
byte what it was.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import torch
import xxhash

from kvtier.codec import CODEC_IDS, PARAMS_SIZE, Codec
from kvtier.errors import CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout, dtype_code, dtype_from_code

MAGIC = b"KVTR"
VERSION = 1
PARAMS_VERSION = 2  # the object's codec parameters are not its codec's own (raw head-major)
_READABLE = (VERSION, PARAMS_VERSION)
HEADER_SIZE = 128
_BODY = struct.Struct(f"<4sHHHBB5IIQ8s16s16s16s{PARAMS_SIZE}s")
_PAD = HEADER_SIZE - 8 - _BODY.size
_CRC = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded header of a stored object."""

    version: int
    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_tokens: int
    payload_len: int
    layout: bytes
    key: ChunkKey
    checksum: bytes
    params: bytes  # the codec's PARAMS_SIZE bytes of parameters


@functools.lru_cache(maxsize=64)
def layout_tag(layout: KVLayout) -> bytes:
    """The 8-byte layout fingerprint stored in headers."""
    return bytes.fromhex(layout.fingerprint)


def pack_header(key: ChunkKey, layout: KVLayout, codec: Codec, kv: torch.Tensor, payload: memoryview) -> bytes:
    """Header bytes for `payload`, the encoding of canonical tensor `kv` under `key`."""
    shape = tuple(kv.shape) + (0,) * (5 - kv.dim())
    params = codec.params_for(kv)
    body = _BODY.pack(
        MAGIC, VERSION if params == codec.params else PARAMS_VERSION, codec.codec_id, 0, dtype_code(kv.dtype),
        kv.dim(), *shape, kv.shape[2], payload.nbytes, layout_tag(layout), key.namespace, key.digest,
        xxhash.xxh3_128_digest(payload), params,
    )  # fmt: skip
    body += bytes(_PAD)
    return body + _CRC.pack(xxhash.xxh3_64_intdigest(body))


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode and self-check a header; CorruptObjectError on any inconsistency."""
    if len(data) < HEADER_SIZE:
        raise CorruptObjectError(f"object is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    head = bytes(data[:HEADER_SIZE])
    if head[:4] != MAGIC:
        raise CorruptObjectError(f"bad magic {head[:4]!r}")
    if _CRC.unpack_from(head, HEADER_SIZE - 8)[0] != xxhash.xxh3_64_intdigest(head[: HEADER_SIZE - 8]):
        raise CorruptObjectError("header checksum mismatch")
    fields = _BODY.unpack_from(head)
    version, codec_id, _flags, dcode, ndim = fields[1:6]
    if version not in _READABLE:
        raise CorruptObjectError(f"unsupported format version {version}")
    if codec_id not in CODEC_IDS:
        raise CorruptObjectError(f"unknown codec id {codec_id}")
    if ndim != 5:
        raise CorruptObjectError(f"canonical tensors have 5 dimensions, header says {ndim}")
    try:
        dtype = dtype_from_code(dcode)
    except ValueError as exc:
        raise CorruptObjectError(str(exc)) from None
    shape, num_tokens, payload_len = tuple(fields[6:11]), fields[11], fields[12]
    layout, namespace, digest, checksum, params = fields[13:18]
    if num_tokens != shape[2]:
        raise CorruptObjectError(f"num_tokens {num_tokens} does not match shape {shape}")
    key = ChunkKey(namespace, digest)
    return Header(version, codec_id, dtype, shape, num_tokens, payload_len, layout, key, checksum, params)


def check_header(header: Header, key: ChunkKey, layout: KVLayout, codec: Codec) -> None:
    """Raise CorruptObjectError unless the header belongs to `key` under `layout` and `codec`'s family
    (the codec's parameters are read from the header at decode time)."""
    if header.key != key:
        raise CorruptObjectError(f"object holds {header.key}, expected {key}")
    if header.layout != layout_tag(layout) or header.dtype != layout.dtype:
        raise CorruptObjectError("object was written under a different KV layout")
    if header.shape != layout.shape(header.num_tokens):
        raise CorruptObjectError(f"shape {header.shape} does not match the layout")
    if header.codec_id != codec.codec_id:
        raise CorruptObjectError(f"object uses codec {CODEC_IDS.get(header.codec_id)}, expected {codec.name}")


def check_payload(header: Header, payload: bytes | bytearray | memoryview) -> None:
    """Raise CorruptObjectError unless the payload has the header's length and checksum."""
    if len(payload) != header.payload_len:
        raise CorruptObjectError(f"payload is {len(payload)} bytes, header says {header.payload_len}")
    check_digest(header, xxhash.xxh3_128_digest(payload))


def payload_hasher() -> xxhash.xxh3_128:
    """An incremental hasher whose digest() check_digest() accepts (for streaming reads)."""
    return xxhash.xxh3_128()


def check_digest(header: Header, digest: bytes) -> None:
    """Raise CorruptObjectError unless `digest` is the header's payload checksum."""
    if digest != header.checksum:
        raise CorruptObjectError("payload checksum mismatch")


def encode_object(key: ChunkKey, layout: KVLayout, codec: Codec, kv: torch.Tensor) -> tuple[bytes, memoryview]:
    """(header, payload) of a stored object; write them back to back."""
    payload = codec.encode(kv)
    return pack_header(key, layout, codec, kv, payload), payload


def validate_object(data: bytes | bytearray | memoryview, key: ChunkKey, layout: KVLayout, codec: Codec) -> Header:
    """The header of a whole stored object whose framing, key, layout, codec and payload checksum
    all check out; CorruptObjectError otherwise."""
    header = parse_header(data)
    check_header(header, key, layout, codec)
    check_payload(header, memoryview(data)[HEADER_SIZE:])
    return header


def decode_payload(
    header: Header, data: bytes | bytearray | memoryview, codec: Codec, device: torch.device | None = None
) -> torch.Tensor:
    """The tensor of a validated object (on `device`, default CPU; raw: a view of `data`)."""
    return codec.decode(memoryview(data)[HEADER_SIZE:], header.shape, header.dtype, header.params, device)


def decode_object(
    data: bytes | bytearray | memoryview,
    key: ChunkKey,
    layout: KVLayout,
    codec: Codec,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Validate a whole stored object and decode its tensor (on `device`, default CPU; raw: a view
    of `data`); CorruptObjectError on any mismatch."""
    return decode_payload(validate_object(data, key, layout, codec), data, codec, device)
