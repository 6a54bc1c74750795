"""Every codec through the disk tier, an fs:// remote tier and the engine: round trips within the
codec's bound, corrupt objects are counted misses, KV a codec cannot encode is a refused put."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.codec import get_codec
from kvtier.storage.disk import DiskTier
from kvtier.storage.remote import open_store
from kvtier.storage.remote.tier import RemoteTier
from tests.codec.conftest import LOSSY, MODEL_LIKE, model_like_kv
from tests.conftest import key

LAYOUT = MODEL_LIKE


def make_tier(kind: str, spec: str, tmp_path):
    if kind == "disk":
        return DiskTier(tmp_path / "disk", 1 << 30, LAYOUT, get_codec(spec))
    return RemoteTier(open_store(f"fs://{tmp_path / 'remote'}"), LAYOUT, get_codec(spec))


@pytest.fixture(params=["disk", "fs"])
def kind(request) -> str:
    return request.param


def test_round_trip_and_stored_size(spec, kind, tmp_path):
    tier = make_tier(kind, spec, tmp_path)
    kv = model_like_kv(LAYOUT, 40, seed=2)
    assert tier.put(key(1), kv)
    out = tier.get(key(1))
    assert out is not None and out.dtype == kv.dtype and out.shape == kv.shape
    assert bool(((out - kv).abs() <= get_codec(spec).error_bound(kv)).all())
    if kind == "disk":
        assert tier.stats.bytes == tier.path(key(1)).stat().st_size == 128 + len(get_codec(spec).encode(kv))
        again = make_tier(kind, spec, tmp_path)  # a restart indexes the file by its size
        assert again.stats.bytes == tier.stats.bytes and torch.equal(again.get(key(1)), out)
    tier.close()


@pytest.mark.parametrize("spec", LOSSY)
def test_corrupt_object_is_a_counted_miss(spec, kind, tmp_path):
    tier = make_tier(kind, spec, tmp_path)
    tier.put(key(1), model_like_kv(LAYOUT, 40))
    files = [p for p in tmp_path.rglob("*.kv")]
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[0].write_bytes(data)
    assert tier.get(key(1)) is None
    assert tier.stats.corrupt == 1 and tier.stats.misses == 1 and not files[0].exists()
    tier.close()


@pytest.mark.parametrize("spec", LOSSY)
def test_kv_the_codec_cannot_encode_is_a_refused_put(spec, kind, tmp_path):
    tier = make_tier(kind, spec, tmp_path)
    kv = model_like_kv(LAYOUT, 8)
    kv[0, 1, 2, 0, 0] = math.inf
    assert tier.put(key(1), kv) is False
    assert tier.stats.put_failures == 1 and tier.get(key(1)) is None
    tier.close()


def test_engine_with_compressed_disk_and_remote(tmp_path):
    """L1 holds exact KV; disk and remote each hold their codec's encoding, under their own namespace."""
    config = Config.from_dict(
        {"l1": {"size": 0}, "disk": {"path": str(tmp_path / "disk")}, "codec": "kivi-4",
         "remote": {"url": f"fs://{tmp_path / 'remote'}", "codec": "cachegen"}}
    )  # fmt: skip
    tokens = list(range(600))
    kv = model_like_kv(LAYOUT, 600)
    with CacheEngine(config, LAYOUT, "m") as engine:
        engine.store(tokens, kv)
        engine.flush()
        disk, remote = engine.chain.lower
        assert engine.retrieve(tokens).shape[2] == 600  # from disk
        assert disk.stats.hits == 3 and remote.stats.puts == 3
    remote_only = config.merged({"disk": {"path": None}})
    with CacheEngine(remote_only, LAYOUT, "m") as engine:
        out = engine.retrieve(tokens)  # the same remote namespace: the engine's codec is still kivi-4
        bound = get_codec("cachegen").error_bound(kv)
        assert out.shape[2] == 600 and bool(((out - kv).abs() <= bound).all())
    other = config.merged({"disk": {"path": None}, "codec": "kivi-2"})
    with CacheEngine(other, LAYOUT, "m") as engine:
        assert engine.lookup(tokens) == 0  # another engine codec: another namespace
