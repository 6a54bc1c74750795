"""The tier contract for every remote (real redis-server, S3 server, shared directory, kvtier server)."""

from __future__ import annotations

import torch

from kvtier.codec.framing import encode_object
from kvtier.codec.raw import RawCodec
from tests.conftest import SMALL, random_kv


def test_put_get_exact(remote, keyspace):
    kv = random_kv(SMALL, 4, seed=3)
    assert remote.put(keyspace(1), kv.clone())
    got = remote.get(keyspace(1))
    assert got is not None and torch.equal(got, kv) and got.dtype == kv.dtype
    assert remote.stats.hits == 1 and remote.stats.puts == 1 and remote.stats.errors == 0


def test_missing_key_is_a_miss(remote, keyspace):
    assert remote.get(keyspace(9)) is None
    assert not remote.contains(keyspace(9))
    assert remote.stats.misses == 1 and remote.stats.errors == 0


def test_prefix_len_in_one_call(remote, keyspace):
    for i in (0, 1, 2, 4):
        assert remote.put(keyspace(i), random_kv(SMALL, 4, seed=i))
    assert remote.contains(keyspace(2)) and not remote.contains(keyspace(3))
    assert remote.prefix_len([keyspace(i) for i in range(6)]) == 3
    assert remote.prefix_len([keyspace(3), keyspace(0)]) == 0
    assert remote.prefix_len([]) == 0


def test_get_many_keeps_order_and_marks_misses(remote, keyspace):
    kvs = {i: random_kv(SMALL, 4 + i, seed=i) for i in (0, 1, 3)}
    for i, kv in kvs.items():
        remote.put(keyspace(i), kv)
    got = remote.get_many([keyspace(i) for i in range(12)])  # more than one batch
    assert [g is not None for g in got] == [i in kvs for i in range(12)]
    for i, kv in kvs.items():
        assert torch.equal(got[i], kv)


def test_put_twice_leaves_a_whole_object(remote, keyspace):
    first, second = random_kv(SMALL, 4, seed=1), random_kv(SMALL, 4, seed=2)
    remote.put(keyspace(1), first)
    remote.put(keyspace(1), second)
    got = remote.get(keyspace(1))
    assert torch.equal(got, first) or torch.equal(got, second)


def test_delete(remote, keyspace):
    remote.put(keyspace(1), random_kv(SMALL, 4))
    assert remote.delete(keyspace(1))
    assert not remote.delete(keyspace(1))
    assert remote.get(keyspace(1)) is None


def test_varied_sizes_and_dtypes(remote, keyspace):
    for i, n in enumerate((1, 4, 255)):
        kv = random_kv(SMALL, n, seed=i)
        remote.put(keyspace(i), kv)
        assert torch.equal(remote.get(keyspace(i)), kv)


def _store_raw(remote, key, parts) -> bool:
    """Write bytes under `key` behind the tier's back; False if the remote refused them."""
    try:
        remote.store.put(key, parts, 5.0)
    except Exception:
        return False
    return True


def test_corrupt_object_is_a_counted_miss_and_deleted(remote, keyspace):
    # an object framed for key 2, stored under key 1: its header names another key
    header, payload = encode_object(keyspace(2), SMALL, RawCodec(), random_kv(SMALL, 4, seed=5))
    stored = _store_raw(remote, keyspace(1), [header, payload])
    assert stored or remote.store.scheme == "kvtier"  # the kvtier server validates objects at put
    assert remote.get(keyspace(1)) is None
    if stored:
        assert remote.stats.corrupt == 1
        assert not remote.store.exists([keyspace(1)], 5.0)[0]  # deleted


def test_flipped_payload_byte_is_detected(remote, keyspace):
    header, payload = encode_object(keyspace(1), SMALL, RawCodec(), random_kv(SMALL, 4, seed=6))
    bad = bytearray(payload)
    bad[17] ^= 0x01
    stored = _store_raw(remote, keyspace(1), [header, bytes(bad)])
    assert stored or remote.store.scheme == "kvtier"
    assert remote.get(keyspace(1)) is None
    assert remote.stats.corrupt == int(stored)
