"""Eviction order of each policy, and pinned chunks are never evicted."""

from __future__ import annotations

import pytest

from kvtier.storage.policy import LFU, LRU, make_policy
from tests.conftest import SMALL, key, random_kv

CHUNK = random_kv(SMALL, 4).nbytes


def fill(tier, ids):
    for i in ids:
        assert tier.put(key(i), random_kv(SMALL, 4, seed=i))
        tier.check()


def held(tier):
    return sorted(int.from_bytes(k.digest, "little") for k in tier.held_keys())


@pytest.mark.parametrize(
    ("policy", "after_4", "after_5"),
    [
        # recency after the reads, oldest first: 1 (never read), 2, 3, 0; frequencies 0:3 1:1 2:3 3:2
        ("lru", [0, 2, 3, 4], [0, 3, 4, 5]),  # 1, then 2 are the least recently used
        ("fifo", [1, 2, 3, 4], [2, 3, 4, 5]),  # reads do not matter: 0, then 1 came first
        ("mru", [1, 2, 3, 4], [1, 2, 3, 5]),  # 0 was used last, then 4 (just inserted)
        ("lfu", [0, 2, 3, 4], [0, 2, 3, 5]),  # 1 was used once; then 4 (once) before 3 (twice)
    ],
)
def test_eviction_order(make_cpu, policy, after_4, after_5):
    tier = make_cpu(4 * CHUNK, policy)
    fill(tier, [0, 1, 2, 3])
    for i in (2, 2, 3, 0, 0):
        assert tier.get(key(i)) is not None
    fill(tier, [4])
    assert held(tier) == after_4
    fill(tier, [5])
    assert held(tier) == after_5
    assert tier.stats.evictions == 2


def test_pinned_chunks_are_never_evicted(make_cpu):
    tier = make_cpu(3 * CHUNK, "lru")
    fill(tier, [0, 1, 2])
    with tier.pinned([key(0), key(1)]):
        fill(tier, [3])  # only 2 is evictable
        assert held(tier) == [0, 1, 3]
        with tier.pinned([key(3)]):
            assert not tier.put(key(4), random_kv(SMALL, 4))  # everything is pinned
            assert tier.stats.put_failures == 1
            assert not tier.delete(key(0))
        tier.check()
    fill(tier, [4])  # unpinned again: 0 is the oldest
    assert held(tier) == [1, 3, 4]


def test_lfu_is_constant_time_per_operation():
    policy = LFU()
    for i in range(10000):
        policy.insert(i)
        policy.touch(i)
    assert next(iter(policy.victims())) == 0
    policy.remove(0)
    assert next(iter(policy.victims())) == 1 and len(policy) == 9999


def test_lru_victims_order():
    policy = LRU()
    for i in range(4):
        policy.insert(i)
    policy.touch(1)
    assert list(policy.victims()) == [0, 2, 3, 1]


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown eviction policy 'lrx'"):
        make_policy("lrx")
