"""The cachegen codec: lossless anchor deltas, layer groups, misdecoding caught, short GIL holds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from kvtier.codec import get_codec
from kvtier.codec.cachegen import _RECORD
from kvtier.errors import CorruptObjectError
from kvtier.layout import KVLayout
from tests.codec.conftest import MODEL_LIKE, model_like_kv

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float32)


def smooth_keys(tokens: int) -> torch.Tensor:
    """KV whose keys drift slowly from token to token (deltas against anchors are small)."""
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(LAYOUT.shape(tokens), generator=gen)
    kv[0] = kv[0].cumsum(1)  # a random walk over tokens per channel
    return kv


def test_delta_modes_decode_identically_and_auto_is_smallest():
    for kv in (smooth_keys(256), model_like_kv(MODEL_LIKE, 256)):
        out, size = {}, {}
        for mode in ("off", "on", "auto"):
            codec = get_codec(f"cachegen:delta={mode}")
            payload = codec.encode(kv)
            size[mode] = len(payload)
            out[mode] = codec.decode(payload, tuple(kv.shape), kv.dtype)
        assert torch.equal(out["off"], out["on"]) and torch.equal(out["off"], out["auto"])
        assert size["auto"] <= min(size["on"], size["off"]) + 64
    assert size_of("cachegen:delta=on", smooth_keys(256)) < 0.9 * size_of("cachegen:delta=off", smooth_keys(256))


def size_of(spec: str, kv: torch.Tensor) -> int:
    return len(get_codec(spec).encode(kv))


def test_layer_groups_get_their_own_bits():
    kv = model_like_kv(MODEL_LIKE, 128)
    codec = get_codec("cachegen:kbits=8-2,vbits=2-8")
    err = (codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype) - kv).abs()
    first, last = err[0, :2].mean(), err[0, 2:].mean()  # keys: 8 bits in layers 0-1, 2 bits in 2-3
    assert first * 20 < last
    assert err[1, 2:].mean() * 20 < err[1, :2].mean()  # values: the other way round
    two, four = size_of("cachegen:kbits=2,vbits=2", kv), size_of("cachegen:kbits=4,vbits=4", kv)
    assert two < four < size_of("cachegen", kv) * 1.5


def test_misdecoded_codes_fail_their_checksum():
    kv = model_like_kv(MODEL_LIKE, 64)
    codec = get_codec("cachegen:delta=off")
    payload = bytearray(codec.encode(kv))
    layers, tokens, channels = MODEL_LIKE.num_layers, 64, 3 * 64
    head = 2 * 2 * layers * (channels + tokens) + 8
    records = np.frombuffer(payload, dtype=_RECORD, count=2 * layers, offset=head)
    tables = head + records.nbytes
    counts = np.frombuffer(payload, dtype="<u4", count=int(records[0]["len0"]), offset=tables).copy()
    i, j = np.argsort(counts)[-2:]  # swap two counts: same total, another model
    counts[[i, j]] = counts[[j, i]]
    payload[tables : tables + counts.nbytes] = counts.tobytes()
    with pytest.raises(CorruptObjectError, match=r"checksum|invalid|grid"):
        codec.decode(payload, tuple(kv.shape), kv.dtype)


def test_wrong_symbol_totals_and_modes_are_rejected():
    kv = model_like_kv(MODEL_LIKE, 64)
    codec = get_codec("cachegen")
    good = codec.encode(kv)
    head = 2 * 2 * MODEL_LIKE.num_layers * (3 * 64 + 64) + 8
    for field, value in (("mode", 7), ("len0", 0), ("first0", 60000)):
        payload = bytearray(good)
        records = np.frombuffer(payload, dtype=_RECORD, count=2 * MODEL_LIKE.num_layers, offset=head).copy()
        records[-1][field] = value  # a value plane record
        payload[head : head + records.nbytes] = records.tobytes()
        with pytest.raises(CorruptObjectError):
            codec.decode(payload, tuple(kv.shape), kv.dtype)


def test_background_encoding_never_holds_the_gil_for_long():
    """Encoding runs on writer threads: the range coder is called per layer, so the request path
    (here the main thread) waits at most about one layer's coding, never a whole chunk's."""
    layout = KVLayout(num_layers=6, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    kv = model_like_kv(layout, 1024)
    codec = get_codec("cachegen")
    start = time.perf_counter()
    codec.encode(kv)
    whole = time.perf_counter() - start
    gaps: list[float] = []
    worker = threading.Thread(target=lambda: [codec.encode(kv) for _ in range(3)])
    worker.start()
    last = time.perf_counter()
    while worker.is_alive():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        time.sleep(0)
    worker.join()
    assert max(gaps) < max(0.5 * whole, 0.02), (max(gaps), whole)
