"""DiskTier.get_many_into: chunks mapped and validated ahead on threads, handed over in order."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.storage import disk as disk_module
from kvtier.storage import mapped
from kvtier.storage.chain import TierChain
from kvtier.storage.staging import StagingBuffer
from tests.conftest import SMALL, key, needs_cachestat, random_kv


def _filled(make_disk, n):
    disk = make_disk(1 << 30)
    chunks = [random_kv(SMALL, 4, seed=i) for i in range(n)]
    for i, kv in enumerate(chunks):
        disk.put(key(i), kv)
    return disk, chunks


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@needs_cachestat
@pytest.mark.parametrize("ahead", [True, False])
def test_every_chunk_arrives_in_order_and_the_buffer_holds_their_mappings(make_disk, monkeypatch, ahead):
    monkeypatch.setattr(disk_module, "VALIDATE_AHEAD", 3)  # windows of 3, 3, 1
    monkeypatch.setattr(disk_module, "SLOW_MAP_US_PER_MB", -1.0 if ahead else 1e12)
    disk, chunks = _filled(make_disk, 7)
    staging = StagingBuffer()
    got = [kv.clone() for kv in disk.get_many_into([key(i) for i in range(7)], staging)]
    assert all(torch.equal(a, b) for a, b in zip(got, chunks, strict=True)) and len(got) == 7
    assert len(staging.held) == 7 and staging._buf.numel() == 0  # read in place, never copied to staging
    assert disk.stats.hits == 7 and disk.stats.bytes_read == sum(c.nbytes for c in chunks)
    disk.check()
    disk.close()


@pytest.mark.parametrize("cached", [True, False])
def test_a_corrupt_chunk_ends_the_run_and_is_deleted(make_disk, monkeypatch, cached):
    if cached and not mapped._KERNEL.available:
        pytest.skip("cachestat(2) needs Linux 6.5+")
    monkeypatch.setattr(mapped._KERNEL, "available", cached)
    disk, chunks = _filled(make_disk, 5)
    _corrupt(disk.path(key(2)))
    got = [kv.clone() for kv in disk.get_many_into([key(i) for i in range(5)], StagingBuffer())]
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, chunks, strict=False))
    assert disk.stats.corrupt == 1 and not disk.path(key(2)).exists() and not disk.contains(key(2))
    assert torch.equal(disk.get(key(3)), chunks[3])  # the chunks after it were not harmed
    disk.check()
    disk.close()


def test_a_missing_file_ends_the_run(make_disk):
    disk, chunks = _filled(make_disk, 4)
    disk.path(key(1)).unlink()  # another process evicted it
    got = list(disk.get_many_into([key(i) for i in range(4)], StagingBuffer()))
    assert len(got) == 1 and torch.equal(got[0], chunks[0])
    assert disk.stats.misses == 1 and not disk.contains(key(1))
    disk.check()
    disk.close()


@needs_cachestat
def test_files_not_wholly_cached_are_read_in_their_place(make_disk, monkeypatch):
    disk, chunks = _filled(make_disk, 4)
    uncached = str(disk.path(key(1)))
    real = disk_module.map_if_cached
    paths = {}

    def partly(fd, size, **options):
        return None if paths.get(fd) == uncached else real(fd, size, **options)

    real_open = open

    def tracking_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        paths[f.fileno()] = str(path)
        return f

    monkeypatch.setattr(disk_module, "map_if_cached", partly)
    monkeypatch.setattr(disk_module, "open", tracking_open, raising=False)
    staging = StagingBuffer()
    got = [kv.clone() for kv in disk.get_many_into([key(i) for i in range(4)], staging)]
    assert all(torch.equal(a, b) for a, b in zip(got, chunks, strict=True)) and len(got) == 4
    assert len(staging.held) == 3 and staging._buf.numel() > 0  # one chunk came through read()
    disk.close()


@needs_cachestat
@pytest.mark.parametrize("map_us_per_mb", [5.0, 500.0])
def test_validation_runs_ahead_on_threads_only_while_mapping_is_slow(make_disk, monkeypatch, map_us_per_mb):
    disk, _ = _filled(make_disk, 4)
    monkeypatch.setattr(disk_module, "SLOW_MAP_US_PER_MB", 50.0)
    disk._map_us_per_mb = map_us_per_mb  # what the tier measured so far
    threads = set()
    real = disk_module.validate_object

    def recording(*args):
        threads.add(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(disk_module, "validate_object", recording)
    assert len(list(disk.get_many_into([key(i) for i in range(4)], StagingBuffer()))) == 4
    if map_us_per_mb > 50:  # 4 KiB pages: spread the page-table work over the cores
        assert threads and all(name.startswith("kvtier-validate") for name in threads)
    else:  # large folios: one by one, each copied out while still in the cache
        assert threads == {threading.current_thread().name}
    assert disk._map_us_per_mb == map_us_per_mb  # chunks under 1 MiB are no sample of the cost
    disk.close()


@needs_cachestat
def test_the_estimate_follows_what_filling_page_tables_costs(tmp_path):
    from kvtier.codec.raw import RawCodec
    from kvtier.layout import KVLayout

    big = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float32)  # 2 MiB per 256 tokens
    disk = disk_module.DiskTier(tmp_path / "big", 1 << 30, big, RawCodec())
    chunks = [random_kv(big, 256, seed=i) for i in range(3)]
    for i, kv in enumerate(chunks):
        disk.put(key(i), kv)
    got = [kv.clone() for kv in disk.get_many_into([key(i) for i in range(3)], StagingBuffer())]
    assert all(torch.equal(a, b) for a, b in zip(got, chunks, strict=True))
    assert 0 < disk._map_us_per_mb < 1e5
    disk.close()


def test_a_chunk_that_checks_out_but_does_not_decode_is_a_counted_corrupt_miss(make_disk, monkeypatch):
    from kvtier.errors import CorruptObjectError

    disk, chunks = _filled(make_disk, 3)
    real = disk_module.decode_payload

    def fussy(header, data, codec, device=None):
        if header.key == key(1):
            raise CorruptObjectError("codec parameters out of range")
        return real(header, data, codec, device)

    monkeypatch.setattr(disk_module, "decode_payload", fussy)
    got = list(disk.get_many_into([key(i) for i in range(3)], StagingBuffer()))
    if mapped._KERNEL.available:  # (without cachestat the read() path decodes: the same accounting)
        assert len(got) == 1 and torch.equal(got[0], chunks[0])
        assert disk.stats.corrupt == 1 and not disk.path(key(1)).exists()
    disk.check()
    disk.close()


def test_the_chain_uses_the_batch_read_and_a_failure_in_it_is_a_miss(make_cpu, make_disk, monkeypatch):
    disk, chunks = _filled(make_disk, 3)
    chain = TierChain(make_cpu(1 << 20), [disk])
    staging = StagingBuffer()
    with chain.fetch([key(i) for i in range(3)], staging) as tensors:
        assert all(torch.equal(a, b) for a, b in zip(tensors, chunks, strict=True))
    assert staging.read_keys == [key(i) for i in range(3)]

    def broken(keys, staging):
        yield chunks[0]
        raise OSError("disk went away")

    monkeypatch.setattr(disk, "get_many_into", broken)
    with chain.fetch([key(i) for i in range(3)], StagingBuffer()) as tensors:
        assert len(list(tensors)) == 1  # the first chunk, then a miss
    assert disk.stats.errors == 1
    chain.close()
