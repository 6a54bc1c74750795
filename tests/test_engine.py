"""CacheEngine: bit-exact store/retrieve, lookup, partial chunks, prefetch and bad input."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheEngine, Config, KVLayout
from kvtier.errors import ConfigError, LayoutError, TokenError
from kvtier.storage import mapped
from tests.conftest import is_mapped, random_kv

LAYOUT = KVLayout(3, 2, 8, torch.bfloat16)


def engine(tmp_path, **overrides):
    data = {"chunk_size": 16, "l1": {"size": "1MiB"}, "disk": {"path": str(tmp_path / "disk"), "size": "4MiB"}}
    data.update(overrides)
    return CacheEngine(Config.from_dict(data), LAYOUT, "test-model")


def tokens(n, offset=0):
    return [(i * 7919 + offset) % 50000 for i in range(n)]


def test_store_retrieve_bit_exact(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 100)
        assert eng.store(tokens(100), kv) == 100
        assert eng.lookup(tokens(100)) == 100
        out = eng.retrieve(tokens(100))
        assert out.dtype == torch.bfloat16 and torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_lookup_counts_the_shared_prefix(tmp_path):
    with engine(tmp_path) as eng:
        eng.store(tokens(100), random_kv(LAYOUT, 100))
        other = tokens(40) + tokens(60, offset=1)
        assert eng.lookup(other) == 32  # two full 16-token chunks; the third differs
        assert torch.equal(eng.retrieve(other), random_kv(LAYOUT, 100)[:, :, :32])
        assert eng.lookup([*tokens(100), 1, 2, 3]) == 96  # the partial chunk 96..100 is not a prefix of 96..103
        assert eng.lookup(tokens(5, offset=3)) == 0
        assert eng.retrieve(tokens(5, offset=3)).shape == LAYOUT.shape(0)


def test_prompt_shorter_than_a_chunk(tmp_path):
    with engine(tmp_path) as eng:
        eng.store(tokens(5), random_kv(LAYOUT, 5))
        assert eng.lookup(tokens(5)) == 5
        assert torch.equal(eng.retrieve(tokens(5)), random_kv(LAYOUT, 5))


def test_without_partial_chunks(tmp_path):
    with engine(tmp_path, save_partial_chunks=False) as eng:
        assert eng.store(tokens(40), random_kv(LAYOUT, 40)) == 32
        assert eng.lookup(tokens(40)) == 32


def test_store_skips_chunks_already_cached(tmp_path):
    with engine(tmp_path) as eng:
        eng.store(tokens(64), random_kv(LAYOUT, 64))
        calls = []
        stored = eng.store_chunks(tokens(80), lambda lo, hi: calls.append((lo, hi)) or random_kv(LAYOUT, hi - lo))
        assert calls == [(64, 80)] and stored == 16


def test_store_gathers_every_chunk_before_the_tiers_get_any(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 64)
        seen = []

        def gather(lo, hi):
            seen.append((eng.chain.writers[0].stats.submitted, eng.lookup(tokens(64))))
            return kv[:, :, lo:hi].clone()

        assert eng.store_chunks(tokens(64), gather) == 64
        assert seen == [(0, 0)] * 4  # no disk write queued, nothing in L1, while gathering
        assert eng.chain.writers[0].stats.submitted == 4 and eng.lookup(tokens(64)) == 64
        assert eng.flush(10) and torch.equal(eng.retrieve(tokens(64)), kv)


def test_a_large_store_reaches_the_tiers_in_bounded_batches(tmp_path, monkeypatch):
    kv = random_kv(LAYOUT, 96)
    for overrides, handoff_bytes in (({"write_queue": 4}, 1 << 30), ({}, 2 * kv[:, :, :16].nbytes)):
        monkeypatch.setattr("kvtier.engine.HANDOFF_BYTES", handoff_bytes)
        with engine(tmp_path / str(handoff_bytes), **overrides) as eng:
            seen = []

            def gather(lo, hi, eng=eng, seen=seen):
                seen.append(eng.chain.writers[0].stats.submitted)
                return kv[:, :, lo:hi].clone()

            assert eng.store_chunks(tokens(96), gather) == 96
            assert seen == [0, 0, 2, 2, 4, 4]  # batches of two chunks: half the queue, or the byte bound
            assert eng.flush(10) and torch.equal(eng.retrieve(tokens(96)), kv)
            if not overrides:  # (a 4-write queue may drop writes when the writer lags: not this test's subject)
                assert eng.chain.writers[0].stats.dropped == 0


def test_a_failing_gather_keeps_the_chunks_gathered_before_it(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 64)

        def gather(lo, hi):
            if lo == 32:
                raise RuntimeError("paged memory went away")
            return kv[:, :, lo:hi].clone()

        with pytest.raises(RuntimeError, match="went away"):
            eng.store_chunks(tokens(64), gather)
        assert eng.lookup(tokens(64)) == 32 and eng.stats()["engine"]["stored_tokens"] == 32
        assert torch.equal(eng.retrieve(tokens(64)), kv[:, :, :32])


def test_a_tier_that_raises_gets_no_chunk_twice(tmp_path, monkeypatch):
    with engine(tmp_path, write_queue=2) as eng:  # batches of one chunk: handed over inside the loop
        calls = []
        store = eng.chain.store

        def failing_store(key, kv):
            calls.append(key)
            if len(calls) == 2:
                raise OSError("tier broke")
            store(key, kv)

        monkeypatch.setattr(eng.chain, "store", failing_store)
        with pytest.raises(OSError, match="tier broke"):
            eng.store_chunks(tokens(64), lambda lo, hi: random_kv(LAYOUT, 64)[:, :, lo:hi].clone())
        assert len(calls) == len(set(calls)) == 2  # the chunks after the failure are not handed over
        assert eng.lookup(tokens(64)) == 16


def test_store_from_an_offset(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 64)
        eng.store(tokens(64), kv[:, :, :32])
        eng.store(tokens(64), kv[:, :, 32:], start=32)
        assert torch.equal(eng.retrieve(tokens(64)), kv)
        with pytest.raises(ValueError, match=r"multiple of the chunk size"):
            eng.store(tokens(64), kv[:, :, 10:], start=10)


def test_retrieve_max_tokens_cuts_the_last_chunk(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 64)
        eng.store(tokens(64), kv)
        assert torch.equal(eng.retrieve(tokens(64), max_tokens=40), kv[:, :, :40])
        assert eng.retrieve(tokens(64), max_tokens=0).shape[2] == 0


def test_restart_hits_the_disk_and_promotes(tmp_path):
    kv = random_kv(LAYOUT, 50)
    with engine(tmp_path) as first:
        first.store(tokens(50), kv)
        assert first.flush(timeout=10)
    with engine(tmp_path) as second:
        assert second.chain.l1.stats.objects == 0
        assert second.lookup(tokens(50)) == 50
        assert torch.equal(second.retrieve(tokens(50)), kv)
        assert second.chain.l1.stats.objects == 4  # promoted into L1
        assert second.stats()["l2"]["hits"] == 4


@pytest.mark.parametrize("mapped_reads", [False, True])
def test_retrieve_into_reads_the_disk_through_reused_buffers_then_promotes(tmp_path, monkeypatch, mapped_reads):
    if mapped_reads and not mapped._KERNEL.available:
        pytest.skip("cachestat(2) needs Linux 6.5+")
    monkeypatch.setattr(mapped._KERNEL, "available", mapped_reads)
    kv = random_kv(LAYOUT, 64)
    with engine(tmp_path) as first:
        first.store(tokens(64), kv)
    with engine(tmp_path) as second:
        out, buffers = LAYOUT.empty(64), set()

        def scatter(lo, hi, part):
            buffers.add(part.untyped_storage().data_ptr())
            out[:, :, lo:hi].copy_(part)

        assert second.retrieve_into(tokens(64), scatter) == 64
        assert torch.equal(out, kv)
        if not mapped_reads:
            assert len(buffers) == 1  # four chunks, one staging buffer: no fresh memory per chunk
        assert second.chain.l1.stats.objects == 0  # promotion waits for the request to end
        assert second.flush(timeout=10)
        assert second.chain.l1.stats.objects == 4  # promoted in the background
        buffers.clear()
        assert second.retrieve_into(tokens(64), scatter) == 64
        assert len(buffers) == 4 and second.stats()["l2"]["hits"] == 8  # now the L1 chunks themselves


def test_a_failing_scatter_leaves_no_read_running_into_the_buffers(tmp_path):
    kv = random_kv(LAYOUT, 64)
    with engine(tmp_path) as first:
        first.store(tokens(64), kv)
    with engine(tmp_path) as second:

        def failing(lo, hi, part):
            if lo == 16:
                raise RuntimeError("engine memory gone")

        with pytest.raises(RuntimeError, match="engine memory gone"):
            second.retrieve_into(tokens(64), failing)
        out = LAYOUT.empty(64)
        assert second.retrieve_into(tokens(64), lambda lo, hi, part: out[:, :, lo:hi].copy_(part)) == 64
        assert torch.equal(out, kv)


def test_retrieve_into_stops_at_a_corrupt_disk_chunk_and_deletes_it(tmp_path):
    kv = random_kv(LAYOUT, 64)
    with engine(tmp_path) as first:
        first.store(tokens(64), kv)
        path = first.chain.lower[0].path(first.chunks(tokens(64))[1].key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(data)
    with engine(tmp_path) as second:
        out = LAYOUT.empty(64)
        got = second.retrieve_into(tokens(64), lambda lo, hi, part: out[:, :, lo:hi].copy_(part))
        assert got == 16 and torch.equal(out[:, :, :16], kv[:, :, :16])
        assert not path.exists() and second.stats()["l2"]["corrupt"] == 1
        assert second.flush(timeout=10) and second.chain.l1.stats.objects == 1


def test_retrieve_into_releases_mapped_disk_chunks_after_the_prefill(tmp_path, monkeypatch):
    if not mapped._KERNEL.available:
        pytest.skip("cachestat(2) needs Linux 6.5+")
    import kvtier.engine

    monkeypatch.setattr(kvtier.engine, "_PROMOTE_WAIT_S", 60.0)  # only the end of the prefill releases them
    kv = random_kv(LAYOUT, 64)
    with engine(tmp_path) as first:
        first.store(tokens(64), kv)
    with engine(tmp_path) as second:
        paths = [str(second.chain.lower[0].path(c.key)) for c in second.chunks(tokens(64))]
        out = LAYOUT.empty(64)
        assert second.retrieve_into(tokens(64), lambda lo, hi, part: out[:, :, lo:hi].copy_(part)) == 64
        assert torch.equal(out, kv)
        assert all(map(is_mapped, paths))  # unmapping waits: it is kernel work the request need not wait for
        second.store(tokens(80), random_kv(LAYOUT, 80))  # the request stores its new chunks: prefill over
        assert second.flush(timeout=10)
        assert not any(map(is_mapped, paths)) and second.chain.l1.stats.objects == 5


def test_close_runs_deferred_releases_at_once(tmp_path, monkeypatch):
    import time

    import kvtier.engine

    monkeypatch.setattr(kvtier.engine, "_PROMOTE_WAIT_S", 30.0)
    kv = random_kv(LAYOUT, 64)
    with engine(tmp_path) as first:
        first.store(tokens(64), kv)
    second = engine(tmp_path, l1={"size": 0})
    for _ in range(3):  # three requests that store nothing: three deferred jobs queued
        assert second.retrieve_into(tokens(64), lambda lo, hi, part: None) == 64
    began = time.monotonic()
    second.close()
    assert time.monotonic() - began < 5.0


def test_prefetch_promotes_into_l1(tmp_path):
    with engine(tmp_path) as first:
        first.store(tokens(50), random_kv(LAYOUT, 50))
    with engine(tmp_path) as second:
        assert second.prefetch(tokens(50)).result(timeout=10) == 50
        assert second.chain.l1.stats.objects == 4


def test_models_and_tenants_do_not_share(tmp_path):
    cfg = Config.from_dict({"chunk_size": 16})
    a = CacheEngine(cfg, LAYOUT, "model-a")
    a.store(tokens(32), random_kv(LAYOUT, 32))
    b = CacheEngine(cfg, LAYOUT, "model-b", chain=a.chain)
    c = CacheEngine(cfg.replace(tenant="other"), LAYOUT, "model-a", chain=a.chain)
    d = CacheEngine(cfg, LAYOUT, "model-a", rank=1, world_size=2, chain=a.chain)
    assert a.lookup(tokens(32)) == 32
    assert b.lookup(tokens(32)) == c.lookup(tokens(32)) == d.lookup(tokens(32)) == 0
    a.close()


def test_requests_with_different_salts_do_not_share(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 40)
        assert eng.store(tokens(40), kv, salt="tenant-a") == 40
        assert eng.lookup(tokens(40)) == eng.lookup(tokens(40), salt="tenant-b") == 0
        assert eng.lookup(tokens(40), salt="tenant-a") == 40
        assert torch.equal(eng.retrieve(tokens(40), salt="tenant-a").view(torch.int16), kv.view(torch.int16))
        assert eng.retrieve(tokens(40), salt="tenant-b").shape[2] == 0
        other = random_kv(LAYOUT, 40)
        assert eng.store(tokens(40), other) == 40  # unsalted: stored apart, the salted chunks untouched
        assert torch.equal(eng.retrieve(tokens(40), salt="tenant-a").view(torch.int16), kv.view(torch.int16))
        assert torch.equal(eng.retrieve(tokens(40), salt="").view(torch.int16), other.view(torch.int16))


def test_bad_kv_is_rejected_and_nothing_is_lost(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 32)
        eng.store(tokens(32), kv)
        with pytest.raises(LayoutError, match=r"dtype"):
            eng.store(tokens(32, 5), torch.zeros(LAYOUT.shape(32), dtype=torch.float32))
        with pytest.raises(LayoutError, match=r"shape"):
            eng.store(tokens(32, 5), torch.zeros(2, 3, 32, 2, 4, dtype=torch.bfloat16))
        with pytest.raises(LayoutError, match=r"only 10 tokens"):
            eng.store(tokens(10), kv)
        with pytest.raises(TokenError):
            eng.store([-1] * 32, kv)
        with pytest.raises(TokenError):
            eng.lookup([1, 2, 2**40])
        assert torch.equal(eng.retrieve(tokens(32)), kv)


def test_budget_smaller_than_one_chunk(tmp_path):
    with pytest.raises(ConfigError, match=r"l1.size: 1.0 KiB cannot hold one chunk \(3.0 KiB"):
        CacheEngine(Config.from_dict({"chunk_size": 16, "l1": {"size": 1024}}), LAYOUT)
    with pytest.raises(ConfigError, match=r"disk.size"):
        CacheEngine(Config.from_dict({"chunk_size": 16, "disk": {"path": str(tmp_path), "size": 100}}), LAYOUT)


def test_engine_without_l1(tmp_path):
    with engine(tmp_path, l1={"size": 0}) as eng:
        kv = random_kv(LAYOUT, 20)
        eng.store(tokens(20), kv)
        eng.flush()
        assert torch.equal(eng.retrieve(tokens(20)), kv)


def test_eviction_in_l1_falls_back_to_disk(tmp_path):
    chunk = LAYOUT.bytes_per_token * 16
    with engine(tmp_path, l1={"size": 2 * chunk}) as eng:
        kv = random_kv(LAYOUT, 80)
        eng.store(tokens(80), kv)
        eng.flush()
        assert eng.chain.l1.stats.objects == 2
        assert torch.equal(eng.retrieve(tokens(80)), kv)  # 5 chunks through a 2-chunk L1
        eng.chain.l1.check()


def test_retrieve_into_from_an_offset(tmp_path):
    with engine(tmp_path) as eng:
        kv = random_kv(LAYOUT, 64)
        eng.store(tokens(64), kv)
        parts = []
        got = eng.retrieve_into(tokens(64), lambda lo, hi, t: parts.append((lo, hi, t.clone())), 56, start=24)
        assert got == 56
        assert [(lo, hi) for lo, hi, _ in parts] == [(24, 32), (32, 48), (48, 56)]
        assert all(torch.equal(t, kv[:, :, lo:hi]) for lo, hi, t in parts)
        assert eng.retrieve_into(tokens(64, 1), lambda *a: None, start=16) == 16  # nothing cached


@pytest.mark.parametrize("codec", ["raw", "fp8", "kivi-4", "cachegen"])
def test_retrieve_into_decodes_compressed_disk_chunks_on_the_callers_device(tmp_path, codec):
    """On a GPU only the compressed bytes cross PCIe; here the meta device stands in for one."""
    kv = random_kv(LAYOUT, 32)
    with engine(tmp_path, codec=codec) as first:
        first.store(tokens(32), kv)
    with engine(tmp_path, codec=codec) as second:
        devices, out = [], LAYOUT.empty(32)

        def record(lo, hi, part):
            devices.append(part.device.type)

        assert second.retrieve_into(tokens(32), record, device="meta") == 32
        assert devices == ["cpu" if codec == "raw" else "meta"] * 2
        assert second.retrieve_into(tokens(32), lambda lo, hi, part: out[:, :, lo:hi].copy_(part), device="cpu") == 32
        assert torch.equal(out, second.retrieve(tokens(32)))  # the same values as the CPU path
        second.flush()
        assert second.chain.l1.stats.objects == 2  # promoted on the CPU, as always
