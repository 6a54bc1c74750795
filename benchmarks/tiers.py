"""L1 and L2 throughput and lookup latency, against memcpy and raw file I/O measured in the same run.

Chunks are 256 tokens of the built-in model's KV shape in bf16 (30 layers x 3 KV heads x 64 dims:
5.9 MB). Targets: L1 retrieve >= 0.8x memcpy, L2 read >= 0.8x raw file read, lookup of a
128k-token prompt < 2 ms.

    python -m benchmarks.tiers [--chunks 32] [--repeat 5] [--dir /tmp/kvtier-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

import torch

from benchmarks._common import median, report, timeit
from kvtier import CacheEngine, Config, KVLayout
from kvtier.codec.raw import RawCodec
from kvtier.storage.disk import READ_PIECE, DiskTier
from kvtier.units import GiB

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
CHUNK = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32, help="chunks per measurement (default 32 = 189 MB)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--dir", default=None, help="directory for the disk measurements (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = args.dir or tempfile.mkdtemp(prefix="kvtier-bench-")
    try:
        rows, summary = run(args.chunks, args.repeat, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report("tiers", ["operation", "GB/s", "vs reference", "reference"], rows, summary)


def run(n: int, repeat: int, root: str) -> tuple[list[list[object]], dict[str, float]]:
    tokens = torch.randint(0, 49152, (n * CHUNK,)).tolist()
    kv = torch.randn(LAYOUT.shape(n * CHUNK)).to(LAYOUT.dtype)
    chunks = [kv[:, :, i * CHUNK : (i + 1) * CHUNK].contiguous() for i in range(n)]
    total = sum(c.nbytes for c in chunks)
    gbps = lambda seconds: total / seconds / 1e9  # noqa: E731

    # references: memcpy of the same bytes, raw file writes and reads of files of the same size
    dst = [torch.empty_like(c) for c in chunks]
    memcpy = gbps(median(timeit(lambda: [d.copy_(c) for d, c in zip(dst, chunks, strict=True)], repeat)))
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir)
    blobs = [c.view(torch.uint8).numpy().tobytes() for c in chunks]
    paths = [os.path.join(raw_dir, f"{i}.bin") for i in range(n)]
    raw_write = gbps(median(timeit(lambda: _raw_write(paths, blobs), repeat, setup=lambda: _remove(paths))))
    raw_read = gbps(median(timeit(lambda: _each(_raw_read, paths), repeat)))
    raw_read_once = gbps(median(timeit(lambda: _each(_raw_read_once, paths), repeat)))

    # L1 through the engine: store (hash + copy into owned chunks + put), retrieve into a caller buffer
    config = Config.from_dict({"l1": {"size": 8 * GiB}})
    engine = CacheEngine(config, LAYOUT, "bench")
    l1_store = gbps(median(timeit(lambda: engine.store(tokens, kv), repeat, setup=engine.chain.l1.clear)))
    out = LAYOUT.empty(n * CHUNK)
    scatter = lambda lo, hi, t: out[:, :, lo:hi].copy_(t)  # noqa: E731
    l1_retrieve = gbps(median(timeit(lambda: engine.retrieve_into(tokens, scatter), repeat)))
    l1_retrieve_alloc = gbps(median(timeit(lambda: engine.retrieve(tokens), repeat)))

    # L2: the disk tier alone (framing, checksums, atomic rename), same page cache as the references
    disk = DiskTier(os.path.join(root, "l2"), 64 * GiB, LAYOUT, RawCodec())
    keys = [c.key for c in engine.chunks(tokens)]

    def clear_disk() -> None:
        for key in keys:
            disk.delete(key)

    l2_write = gbps(median(timeit(lambda: [disk.put(k, c) for k, c in zip(keys, chunks, strict=True)], repeat,
                                  setup=clear_disk)))  # fmt: skip
    for k, c in zip(keys, chunks, strict=True):
        disk.put(k, c)
    l2_read = gbps(median(timeit(lambda: _each(disk.get, keys), repeat)))
    # the same from the device: evict both sets of files from the page cache before each read
    l2_files = [str(disk.path(k)) for k in keys]
    raw_cold = gbps(median(timeit(lambda: _each(_raw_read, paths), repeat, setup=lambda: _evict(paths))))
    l2_cold = gbps(median(timeit(lambda: _each(disk.get, keys), repeat, setup=lambda: _evict(l2_files))))
    assert all(torch.equal(disk.get(k), c) for k, c in zip(keys, chunks, strict=True))

    lookup_rows, lookup = _lookup(repeat)
    rows: list[list[object]] = [
        ["memcpy (reference)", memcpy, 1.0, "-"],
        ["L1 store (engine.store)", l1_store, l1_store / memcpy, "memcpy"],
        ["L1 retrieve_into", l1_retrieve, l1_retrieve / memcpy, "memcpy"],
        ["L1 retrieve (allocates)", l1_retrieve_alloc, l1_retrieve_alloc / memcpy, "memcpy"],
        ["raw write to new files (reference)", raw_write, 1.0, "-"],
        ["raw read into new buffers (reference)", raw_read, 1.0, "-"],
        ["L2 write (put)", l2_write, l2_write / raw_write, "raw write"],
        ["raw read, one read() per file", raw_read_once, raw_read_once / raw_read, "raw read"],
        ["L2 read (get)", l2_read, l2_read / raw_read, "raw read"],
        ["raw read, not in page cache (reference)", raw_cold, 1.0, "-"],
        ["L2 read, not in page cache", l2_cold, l2_cold / raw_cold, "raw read, not cached"],
        *lookup_rows,
    ]
    summary = {
        "chunk_mb": round(chunks[0].nbytes / 1e6, 2),
        "memcpy_gbps": round(memcpy, 2),
        "l1_retrieve_vs_memcpy": round(l1_retrieve / memcpy, 3),
        "l1_store_vs_memcpy": round(l1_store / memcpy, 3),
        "l2_read_vs_raw": round(l2_read / raw_read, 3),
        "l2_read_vs_raw_single_read": round(l2_read / raw_read_once, 3),
        "l2_write_vs_raw": round(l2_write / raw_write, 3),
        "l2_read_uncached_vs_raw": round(l2_cold / raw_cold, 3),
        **lookup,
    }
    engine.close()
    return rows, summary


def _lookup(repeat: int) -> tuple[list[list[object]], dict[str, float]]:
    """Latency of lookup() for a fully cached 128k-token prompt (the worst case: every chunk hashed)."""
    n_tokens = 128 * 1024
    tokens = torch.randint(0, 49152, (n_tokens,))
    small = KVLayout(1, 1, 1, torch.bfloat16)  # tiny chunks: lookup cost does not depend on KV size
    engine = CacheEngine(Config.from_dict({"l1": {"size": GiB}}), small, "bench")
    engine.store(tokens, torch.zeros(small.shape(n_tokens), dtype=torch.bfloat16))
    as_list = tokens.tolist()
    results = {}
    for name, toks in (("list", as_list), ("tensor", tokens)):
        times = timeit(lambda toks=toks: engine.lookup(toks), repeat * 4, setup=engine._memo.clear)
        assert engine.lookup(toks) == n_tokens
        results[name] = median(times) * 1e3
    repeat_ms = median(timeit(lambda: engine.lookup(as_list), repeat * 4)) * 1e3
    engine.close()
    rows: list[list[object]] = [
        ["lookup 128k tokens, list (ms)", results["list"], "", "target < 2 ms"],
        ["lookup 128k tokens, tensor (ms)", results["tensor"], "", "target < 2 ms"],
        ["lookup 128k tokens, same prompt again (ms)", repeat_ms, "", "memoized keys"],
    ]
    summary = {"lookup_128k_list_ms": round(results["list"], 3), "lookup_128k_tensor_ms": round(results["tensor"], 3)}
    return rows, summary


def _raw_write(paths: list[str], blobs: list[bytes]) -> None:
    """Write each blob to a new file: the least any disk cache must do."""
    for path, blob in zip(paths, blobs, strict=True):
        with open(path, "wb", buffering=0) as f:
            f.write(blob)


def _raw_read_once(path: str) -> torch.Tensor:
    """Read a whole file into a new buffer with one readinto()."""
    with open(path, "rb", buffering=0) as f:
        out = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8)
        f.readinto(out.numpy().data)
    return out


def _evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache so the next read goes to the device."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _remove(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


def _each(fn: Any, items: list[Any]) -> None:
    """Call fn on each item, dropping each result before the next call.

    Reads are compared this way so that both sides reuse the same freed memory: keeping results
    would add page-fault costs that depend on the allocator's state, not on the I/O path.
    """
    for item in items:
        fn(item)


def _raw_read(path: str) -> torch.Tensor:
    """Read a whole file into a new buffer in READ_PIECE reads, as the disk tier does, minus validation."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        out = torch.empty(size, dtype=torch.uint8)
        view = out.numpy().data
        got = 0
        while got < size:
            got += f.readinto(view[got : got + READ_PIECE])
    return out


if __name__ == "__main__":
    main()
