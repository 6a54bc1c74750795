"""The tier chain: prefix across tiers, promotion, asynchronous writes and failing tiers."""

from __future__ import annotations

import threading
import time

import torch

from kvtier.storage import mapped
from kvtier.storage.chain import TierChain
from kvtier.storage.faulty import FaultyTier
from kvtier.storage.staging import StagingBuffer
from kvtier.storage.writer import JobStatus
from tests.conftest import SMALL, key, random_kv

CHUNK = random_kv(SMALL, 4).nbytes


def keys(n):
    return [key(i) for i in range(n)]


def test_prefix_spans_tiers_and_promotes(make_cpu, make_disk):
    l1, l2 = make_cpu(100 * CHUNK), make_disk(100 * (CHUNK + 128))
    chain = TierChain(l1, [l2])
    for i in (0, 2):
        l1.put(key(i), random_kv(SMALL, 4, seed=i))
    for i in (1, 3):
        l2.put(key(i), random_kv(SMALL, 4, seed=i))
    assert chain.lookup(keys(6)) == 4
    with chain.fetch(keys(6)) as tensors:
        assert [torch.equal(t, random_kv(SMALL, 4, seed=i)) for i, t in enumerate(tensors)] == [True] * 4
    assert l1.contains(key(1)) and l1.contains(key(3))  # promoted
    assert l2.stats.hits == 2
    l1.check()
    l2.check()
    chain.close()


def test_store_writes_l1_now_and_lower_tiers_later(make_cpu, make_disk):
    l1, l2 = make_cpu(100 * CHUNK), make_disk(100 * (CHUNK + 128))
    chain = TierChain(l1, [l2])
    jobs = chain.store(key(1), random_kv(SMALL, 4))
    assert l1.contains(key(1))
    assert chain.flush(timeout=10)
    assert [j.status for j in jobs] == [JobStatus.STORED]
    assert torch.equal(l2.get(key(1)), random_kv(SMALL, 4))
    jobs = chain.store(key(1), random_kv(SMALL, 4))
    chain.flush()
    assert [j.status for j in jobs] == [JobStatus.PRESENT]
    chain.close()


def test_full_queue_drops_the_oldest_and_never_blocks(make_cpu, make_disk):
    slow = FaultyTier(make_disk(100 * (CHUNK + 128)))
    slow.gate = threading.Event()  # the writer blocks inside the first put
    chain = TierChain(make_cpu(100 * CHUNK), [slow], max_pending=2)
    jobs = [chain.store(key(0), random_kv(SMALL, 4, seed=0))[0]]
    deadline = time.monotonic() + 10
    while not slow.calls.get("put") and time.monotonic() < deadline:  # the writer holds key 0 at the gate
        time.sleep(0.001)
    jobs += [chain.store(key(i), random_kv(SMALL, 4, seed=i))[0] for i in range(1, 6)]
    writer = chain.writers[0]
    assert writer.stats.dropped >= 3  # one job in the tier, two queued, the rest dropped
    assert [j.status for j in jobs[-2:]] == [JobStatus.PENDING, JobStatus.PENDING]
    dropped = [j for j in jobs if j.status is JobStatus.DROPPED]
    assert dropped and all(j.reason == "write queue full" for j in dropped)
    slow.gate.set()
    assert chain.flush(timeout=10)
    assert all(j.status in (JobStatus.STORED, JobStatus.DROPPED) for j in jobs)
    assert slow.inner.contains(key(5)) and not slow.inner.contains(key(1))
    chain.close()


def test_failing_lower_tier_degrades_to_a_miss(make_cpu, make_disk):
    l2 = FaultyTier(make_disk(100 * (CHUNK + 128)))
    chain = TierChain(make_cpu(100 * CHUNK), [l2])
    l2.inner.put(key(0), random_kv(SMALL, 4))
    l2.fail_lookup = True
    assert chain.lookup(keys(2)) == 0
    l2.fail_lookup, l2.fail_get = False, True
    with chain.fetch(keys(2)) as tensors:
        assert list(tensors) == []
    l2.fail_get, l2.fail_put = False, True
    job = chain.store(key(5), random_kv(SMALL, 4))[0]
    chain.flush(10)
    assert job.status is JobStatus.FAILED and "injected put failure" in job.reason
    assert l2.stats.errors == 2
    chain.close()


def test_staged_reads_share_one_buffer_and_fail_as_misses(make_cpu, make_disk, monkeypatch):
    monkeypatch.setattr(mapped._KERNEL, "available", False)  # files not known cached: read() into staging
    l2 = FaultyTier(make_disk(100 * (CHUNK + 128)))
    chain = TierChain(make_cpu(100 * CHUNK), [l2])
    for i in range(3):
        l2.inner.put(key(i), random_kv(SMALL, 4, seed=i))
    staging = StagingBuffer()
    with chain.fetch(keys(3), staging) as tensors:
        for i, kv in enumerate(tensors):
            assert torch.equal(kv, random_kv(SMALL, 4, seed=i))
            assert kv.untyped_storage().data_ptr() == staging.take(0).untyped_storage().data_ptr()
    assert staging.read_keys == keys(3) and chain.l1.stats.objects == 0  # the caller promotes
    l2.fail_get = True
    with chain.fetch(keys(3), StagingBuffer()) as tensors:
        assert list(tensors) == []
    assert l2.stats.errors == 1
    l2.fail_get, l2.lose_data = False, True
    with chain.fetch(keys(3), StagingBuffer()) as tensors:
        assert list(tensors) == []
    chain.close()


def test_chunk_lost_between_lookup_and_get_ends_the_prefix(make_cpu, make_disk):
    l2 = FaultyTier(make_disk(100 * (CHUNK + 128)))
    l1 = make_cpu(100 * CHUNK)
    chain = TierChain(l1, [l2])
    l1.put(key(0), random_kv(SMALL, 4, seed=0))
    for i in (1, 2):
        l2.inner.put(key(i), random_kv(SMALL, 4, seed=i))
    l1.put(key(3), random_kv(SMALL, 4, seed=3))
    l2.lose_data = True
    with chain.fetch(keys(4)) as tensors:
        assert len(list(tensors)) == 1  # chunks 1-2 vanished, so chunk 3 cannot be used either
    chain.close()


def test_no_l1(make_disk):
    l2 = make_disk(100 * (CHUNK + 128))
    chain = TierChain(None, [l2])
    chain.store(key(0), random_kv(SMALL, 4))
    chain.flush()
    with chain.fetch(keys(1)) as tensors:
        assert torch.equal(next(tensors), random_kv(SMALL, 4))
    chain.close()
