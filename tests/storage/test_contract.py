"""The contract every tier passes: exact round trips, misses, deletes, budgets, invariants."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SMALL, key, random_kv

CHUNK = random_kv(SMALL, 4).nbytes  # 512 bytes of payload per 4-token chunk


@pytest.fixture(params=["cpu", "disk"])
def tier(request, make_cpu, make_disk):
    """A tier with room for about 8 chunks."""
    made = make_cpu(8 * CHUNK) if request.param == "cpu" else make_disk(8 * (CHUNK + 128))
    yield made
    made.check()
    made.close()


def test_put_get_exact(tier):
    kv = random_kv(SMALL, 4, seed=3)
    assert tier.put(key(1), kv.clone())
    tier.check()
    got = tier.get(key(1))
    assert got is not None and torch.equal(got, kv)
    assert tier.stats.hits == 1 and tier.stats.objects == 1


def test_missing_key_is_a_miss(tier):
    assert tier.get(key(9)) is None
    assert not tier.contains(key(9))
    assert tier.stats.misses == 1


def test_contains_and_prefix_len(tier):
    for i in (0, 1, 2, 4):
        tier.put(key(i), random_kv(SMALL, 4, seed=i))
    assert tier.contains(key(2)) and not tier.contains(key(3))
    assert tier.prefix_len([key(i) for i in range(6)]) == 3
    assert tier.prefix_len([key(3), key(0)]) == 0
    assert tier.prefix_len([]) == 0
    tier.check()


def test_put_twice_keeps_the_first(tier):
    first = random_kv(SMALL, 4, seed=1)
    tier.put(key(1), first)
    tier.put(key(1), random_kv(SMALL, 4, seed=2))
    assert torch.equal(tier.get(key(1)), first)
    assert tier.stats.objects == 1
    tier.check()


def test_delete(tier):
    tier.put(key(1), random_kv(SMALL, 4))
    assert tier.delete(key(1))
    assert not tier.delete(key(1))
    assert tier.get(key(1)) is None and tier.stats.objects == 0
    tier.check()


def test_budget_is_respected_and_evicts(tier):
    for i in range(20):
        assert tier.put(key(i), random_kv(SMALL, 4, seed=i))
        tier.check()
    assert tier.stats.objects == 8 and tier.stats.evictions == 12
    assert tier.contains(key(19)) and not tier.contains(key(0))


def test_chunk_larger_than_budget_is_refused(tier):
    tier.put(key(1), random_kv(SMALL, 4))
    assert not tier.put(key(2), random_kv(SMALL, 4 * 20))
    assert tier.stats.put_failures == 1
    assert torch.equal(tier.get(key(1)), random_kv(SMALL, 4))  # nothing stored before is lost
    tier.check()


def test_varied_sizes_and_dtypes(tier):
    for i, n in enumerate((1, 3, 4)):
        kv = random_kv(SMALL, n, seed=i)
        tier.put(key(i), kv)
        assert torch.equal(tier.get(key(i)), kv)
    tier.check()
