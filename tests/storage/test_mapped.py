"""Zero-copy staged reads of cached disk files: what they return, when they fall back to read()."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.tiers import _evict
from kvtier.storage import mapped
from kvtier.storage.staging import StagingBuffer
from tests.conftest import SMALL, is_mapped, key, needs_cachestat, random_kv


def _cached_pages(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return mapped._KERNEL.cached_pages(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _map(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return mapped.map_if_cached(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@needs_cachestat
def test_cached_fileis_mapped_copy_on_write(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    view = _map(path)
    assert view is not None and bytes(view) == path.read_bytes()
    view[0] = 255  # private mapping: the file keeps its bytes
    assert path.read_bytes()[0] == 0
    del view  # unmapped: its pages can leave the page cache
    _evict([str(path)])
    if _cached_pages(path) == 0:  # (tmpfs keeps its pages whatever fadvise says)
        assert _map(path) is None  # pages not all cached: the caller must read()


def test_empty_file_is_not_mapped(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert _map(path) is None


@needs_cachestat
def test_staged_disk_read_of_a_cached_file_is_a_view_of_the_file(make_disk):
    disk = make_disk(1 << 30)
    kv = random_kv(SMALL, 4, seed=1)
    disk.put(key(0), kv)
    staging = StagingBuffer()
    got = disk.get_into(key(0), staging)
    assert torch.equal(got, kv)
    assert staging._buf.numel() == 0  # read in place: the staging buffer was never allocated
    got.fill_(0)  # the caller may write into what it got: the stored object stays intact
    assert torch.equal(disk.get(key(0)), kv)
    disk.check()


@pytest.mark.parametrize("cached", [True, False])
def test_corrupt_byte_in_a_staged_read_is_a_miss_and_deleted(make_disk, monkeypatch, cached):
    if cached and not mapped._KERNEL.available:
        pytest.skip("cachestat(2) needs Linux 6.5+")
    monkeypatch.setattr(mapped._KERNEL, "available", cached and mapped._KERNEL.available)
    disk = make_disk(1 << 30)
    disk.put(key(0), random_kv(SMALL, 4, seed=1))
    disk.put(key(1), random_kv(SMALL, 4, seed=2))
    path = disk.path(key(0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert disk.get_into(key(0), StagingBuffer()) is None
    assert disk.stats.corrupt == 1 and not path.exists() and not disk.contains(key(0))
    assert torch.equal(disk.get_into(key(1), StagingBuffer()), random_kv(SMALL, 4, seed=2))  # others intact
    disk.check()


def test_read_falls_back_when_the_kernel_cannot_say(make_disk, monkeypatch):
    monkeypatch.setattr(mapped._KERNEL, "available", False)
    disk = make_disk(1 << 30)
    kv = random_kv(SMALL, 4, seed=3)
    disk.put(key(0), kv)
    staging = StagingBuffer()
    got = disk.get_into(key(0), staging)
    assert torch.equal(got, kv)
    assert got.untyped_storage().data_ptr() == staging.take(0).untyped_storage().data_ptr()


@needs_cachestat
@pytest.mark.parametrize("with_l1", [True, False])
def test_chain_keeps_copies_not_mapped_files(make_cpu, make_disk, with_l1):
    """What the chain promotes or hands out owns its memory: holding 40 chunks holds no files open."""
    from kvtier.storage.chain import TierChain

    disk = make_disk(1 << 30)
    chunks = [random_kv(SMALL, 4, seed=i) for i in range(40)]
    for i, kv in enumerate(chunks):
        disk.put(key(i), kv)
    chain = TierChain(make_cpu(1 << 30) if with_l1 else None, [disk])
    fds = len(os.listdir("/proc/self/fd"))
    with chain.fetch([key(i) for i in range(40)]) as tensors:
        kept = list(tensors)
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert all(torch.equal(a, b) for a, b in zip(kept, chunks, strict=True))
    assert len(os.listdir("/proc/self/fd")) <= fds + 2  # get() returns memory of its own
    held = disk.get_into(key(0), StagingBuffer())  # a staged read is a view of the mapped file, no descriptor open
    assert len(os.listdir("/proc/self/fd")) == fds
    assert is_mapped(disk.path(key(0)))
    del held
    assert not is_mapped(disk.path(key(0)))
    staging = StagingBuffer()
    held = list(disk.get_many_into([key(0)], staging))
    del held
    assert is_mapped(disk.path(key(0)))  # a batch read's buffer holds its mappings until released
    staging.take_held()
    assert not is_mapped(disk.path(key(0)))
    chain.close()


@needs_cachestat
def test_a_mapping_outlives_its_descriptor_and_goes_with_its_last_view(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 4096)
    view = _map(path)  # the descriptor is closed by now
    mapped.populate(view)
    tensor = torch.frombuffer(view, dtype=torch.uint8)
    del view
    assert is_mapped(path) and bytes(tensor[:256].numpy()) == bytes(range(256))
    del tensor
    assert not is_mapped(path)


def test_populate_gives_up_quietly_on_a_kernel_without_it(tmp_path, monkeypatch):
    import ctypes
    import errno

    def refuse(address, length, advice):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(mapped._KERNEL, "_madvise", refuse)
    monkeypatch.setattr(mapped._KERNEL, "can_populate", True)
    view = memoryview(bytearray(4096))
    mapped.populate(view)  # no error: pages fault in on first use instead
    assert mapped._KERNEL.can_populate is False


@needs_cachestat
def test_a_mostly_cached_fileis_mapped_with_its_missing_pages_read_in(tmp_path):
    path = tmp_path / "f"
    data = bytes(range(256)) * 65536  # 16 MiB: whole large folios leave the cache
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, len(data) // 4, os.POSIX_FADV_DONTNEED)  # a quarter leaves the page cache
        if mapped._KERNEL.cached_pages(fd, len(data)) == len(data) // 4096:
            pytest.skip("this filesystem keeps its pages cached")
        assert mapped.map_if_cached(fd, len(data)) is None  # not wholly cached: read() it
        if not mapped._KERNEL.can_populate:
            pytest.skip("MADV_POPULATE_READ needs Linux 5.14+")
        view = mapped.map_if_cached(fd, len(data), populated=True)  # mostly cached: map, fault the rest in now
        assert view is not None and bytes(view) == data
        del view  # (the kernel keeps mapped pages)
        os.posix_fadvise(fd, 0, len(data), os.POSIX_FADV_DONTNEED)
        if mapped._KERNEL.cached_pages(fd, len(data)) * 2 < len(data) // 4096:
            assert mapped.map_if_cached(fd, len(data), populated=True) is None  # mostly evicted: read() it
    finally:
        os.close(fd)
