"""The contract every codec keeps: round trips within its documented bound, deterministic bytes,
parameters read from the header, and a corrupted object is an error, never wrong KV."""

from __future__ import annotations

import math

import pytest
import torch
import xxhash

from kvtier.codec import PARAMS_SIZE, get_codec
from kvtier.codec.framing import _BODY, _CRC, HEADER_SIZE, decode_object, encode_object, parse_header
from kvtier.errors import CodecError, CorruptObjectError
from kvtier.layout import KVLayout, is_head_major
from tests.codec.conftest import LOSSY, MODEL_LIKE, model_like_kv
from tests.conftest import key, random_kv

LAYOUTS = {
    "f32": KVLayout(3, 2, 16, torch.float32),
    "bf16": KVLayout(3, 2, 16, torch.bfloat16),
    "f16": KVLayout(2, 1, 8, torch.float16),
    "mla": KVLayout(2, 1, 24, torch.bfloat16, mla=True),
}


def round_trip(spec: str, kv: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    codec = get_codec(spec)
    payload = codec.encode(kv)
    return codec.decode(bytearray(payload), tuple(kv.shape), kv.dtype), payload


def assert_within_bound(spec: str, kv: torch.Tensor) -> None:
    out, _ = round_trip(spec, kv)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    err = (out.float() - kv.float()).abs()
    bound = get_codec(spec).error_bound(kv)
    assert bool((err <= bound).all()), f"{spec}: error exceeds the bound by {float((err - bound).max())}"


@pytest.mark.parametrize("tokens", [1, 5, 37, 64])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_random_kv_within_bound(spec, layout, tokens):
    assert_within_bound(spec, random_kv(layout, tokens, seed=tokens) * 3)


@pytest.mark.parametrize("tokens", [256, 100])
def test_model_like_kv_within_bound(spec, tokens):
    assert_within_bound(spec, model_like_kv(MODEL_LIKE, tokens))


def test_constant_and_zero_kv(spec):
    layout = LAYOUTS["f32"]
    for kv in (torch.zeros(layout.shape(9)), torch.full(layout.shape(9), -2.5)):
        out, _ = round_trip(spec, kv)
        assert torch.allclose(out, kv, atol=1e-3)


def test_bounds_are_tight_enough_to_mean_something():
    kv = model_like_kv(MODEL_LIKE, 256)
    spread = kv.float().abs().mean()
    for spec, most in [("fp8", 0.07), ("kivi-4", 0.1), ("cachegen", 0.25), ("kivi-2", 0.5)]:
        assert float(get_codec(spec).error_bound(kv).mean()) < most * spread, spec


def test_encoding_is_deterministic(spec):
    kv = model_like_kv(MODEL_LIKE, 100, seed=3)
    first = bytes(get_codec(spec).encode(kv))
    assert bytes(get_codec(spec).encode(kv.clone())) == first
    assert bytes(get_codec(spec).encode(kv)) == first


def test_sizes_against_bf16():
    kv = model_like_kv(MODEL_LIKE, 256).bfloat16()
    ratio = {s: kv.nbytes / len(get_codec(s).encode(kv)) for s in ("fp8", "kivi-2", "kivi-4", "kivi-2:group=32")}
    assert 1.9 < ratio["fp8"] < 2.0
    assert ratio["kivi-2"] == pytest.approx(6.4, rel=0.01)  # 2 bits + 32 bits per 64 values
    assert ratio["kivi-4"] == pytest.approx(3.2, rel=0.01)
    assert ratio["kivi-2:group=32"] == pytest.approx(16 / 3, rel=0.01)


@pytest.mark.parametrize("spec", LOSSY)
def test_non_finite_kv_is_a_codec_error(spec):
    kv = random_kv(LAYOUTS["f32"], 4)
    kv[1, 0, 2, 0, 3] = math.nan
    with pytest.raises(CodecError, match="infinite or NaN"):
        get_codec(spec).encode(kv)


def test_params_travel_in_the_header(spec):
    codec = get_codec(spec)
    assert len(codec.params) == PARAMS_SIZE
    layout = LAYOUTS["bf16"]
    kv = random_kv(layout, 11)
    header, payload = encode_object(key(1), layout, codec, kv)
    data = bytearray(header + payload.tobytes())
    assert parse_header(data).params == codec.params
    # a reader configured with other options of the same family decodes with the stored ones
    other = {"fp8": "fp8-e5m2", "kivi": "kivi-4:group=5", "cachegen": "cachegen:kbits=3,vbits=8"}
    family = next((f for f in other if codec.name.startswith(f)), None)
    if family:
        reader = get_codec(other[family])
        assert torch.equal(decode_object(data, key(1), layout, reader), decode_object(data, key(1), layout, codec))


def test_every_single_byte_corruption_of_an_object_is_rejected(spec):
    layout = LAYOUTS["f16"]
    codec = get_codec(spec)
    header, payload = encode_object(key(1), layout, codec, random_kv(layout, 6))
    good = bytearray(header + payload.tobytes())
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x10
        with pytest.raises(CorruptObjectError):
            decode_object(bad, key(1), layout, codec)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_head_major_chunk_encodes_like_its_token_major_copy(spec, layout):
    kv = random_kv(layout, 13)
    head_major = layout.empty(13, head_major=True).copy_(kv)
    assert torch.equal(head_major, kv) and is_head_major(head_major) == (layout.num_kv_heads > 1)
    codec = get_codec(spec)
    header, payload = encode_object(key(1), layout, codec, head_major)
    out = decode_object(bytearray(header + payload.tobytes()), key(1), layout, codec)
    token_major = decode_object(bytearray(b"".join(map(bytes, encode_object(key(1), layout, codec, kv)))), key(1),
                                layout, codec)  # fmt: skip
    assert torch.equal(out, token_major)
    if spec == "raw":  # stored in its own order, read back as a view in that order: no copy either way
        assert bytes(payload) == head_major.transpose(2, 3).reshape(-1).view(torch.uint8).numpy().tobytes()
        assert is_head_major(out) == is_head_major(head_major)
        assert parse_header(header).params[0] == is_head_major(head_major)
        # version 2, which readers from before codec parameters (they ignored them) reject
        assert parse_header(header).version == (2 if is_head_major(head_major) else 1)
    else:  # the other codecs' payloads do not depend on the memory order
        assert bytes(payload) == bytes(codec.encode(kv)) and parse_header(header).params == codec.params
        assert parse_header(header).version == 1


def test_raw_reads_token_major_objects_written_before_head_major_ones():
    layout = LAYOUTS["bf16"]
    kv = random_kv(layout, 7)
    codec = get_codec("raw")
    data = reframe(bytearray(b"".join(map(bytes, encode_object(key(1), layout, codec, kv)))), params=bytes(PARAMS_SIZE))
    out = decode_object(data, key(1), layout, codec)
    assert torch.equal(out, kv) and out.is_contiguous()


def reframe(data: bytearray, params: bytes | None = None, payload: bytes | None = None) -> bytearray:
    """`data` with other params or payload, with the header's checksums made valid again."""
    fields = list(_BODY.unpack_from(data))
    body_payload = bytes(data[HEADER_SIZE:]) if payload is None else payload
    fields[12], fields[16] = len(body_payload), xxhash.xxh3_128_digest(body_payload)
    if params is not None:
        fields[17] = params
    body = _BODY.pack(*fields).ljust(HEADER_SIZE - 8, b"\0")
    return bytearray(body + _CRC.pack(xxhash.xxh3_64_intdigest(body)) + body_payload)


def test_malformed_params_with_a_valid_header_are_rejected(spec):
    layout = LAYOUTS["bf16"]
    codec = get_codec(spec)
    header, payload = encode_object(key(1), layout, codec, random_kv(layout, 9))
    data = bytearray(header + payload.tobytes())
    first = codec.params[0] + (2 if spec == "raw" else 1)  # raw's 1 is a valid memory order (head-major)
    for params in (b"\xff" * PARAMS_SIZE, bytes([first]) + codec.params[1:], codec.params[:-1] + b"\x07"):
        with pytest.raises(CorruptObjectError):
            decode_object(reframe(data, params=params), key(1), layout, codec)


def test_payload_of_the_wrong_length_with_a_valid_header_is_rejected(spec):
    layout = LAYOUTS["bf16"]
    codec = get_codec(spec)
    header, payload = encode_object(key(1), layout, codec, random_kv(layout, 9))
    data = bytearray(header + payload.tobytes())
    for body in (payload.tobytes()[:-4], payload.tobytes() + bytes(4), b""):
        with pytest.raises(CorruptObjectError):
            decode_object(reframe(data, payload=body), key(1), layout, codec)


def test_objects_of_another_codec_family_are_rejected():
    layout = LAYOUTS["bf16"]
    header, payload = encode_object(key(1), layout, get_codec("kivi-2"), random_kv(layout, 9))
    with pytest.raises(CorruptObjectError, match="expected fp8"):
        decode_object(bytearray(header + payload.tobytes()), key(1), layout, get_codec("fp8"))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_encode_and_decode_on_a_device(spec, device):
    """Codecs compute with torch on the KV's device, and decode onto a requested one."""
    kv = model_like_kv(MODEL_LIKE, 64)
    codec = get_codec(spec)
    payload = bytearray(codec.encode(kv.to(device)))
    out = codec.decode(payload, tuple(kv.shape), kv.dtype, device=device)
    assert out.device.type == device
    assert bool(((out.cpu() - kv).abs() <= codec.error_bound(kv)).all())
