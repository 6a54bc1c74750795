"""L1 and L2 throughput and lookup latency, against memcpy and raw file I/O measured in the same run.

Chunks are 256 tokens of the built-in model's KV shape in bf16 (30 layers x 3 KV heads x 64 dims:
5.9 MB). Targets: L1 retrieve >= 0.8x memcpy, L2 read >= 0.8x raw file read, lookup of a
128k-token prompt < 2 ms. L2 reads are measured three ways: `get` (into new memory of its own: the
promotion path), `get_into` + a copy out (the retrieve path: cached files are read in place), and
the engine's `retrieve_into` with no L1 (every chunk from the disk tier, scattered into one output),
each against raw reads of the same files doing the same.

    python -m benchmarks.tiers [--chunks 32] [--repeat 5] [--dir /tmp/kvtier-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

import torch

from benchmarks._common import median, paired, report, timeit
from kvtier import CacheEngine, Config, KVLayout
from kvtier.codec.raw import RawCodec
from kvtier.storage.disk import DiskTier
from kvtier.storage.filetier import READ_PIECE
from kvtier.storage.staging import StagingBuffer
from kvtier.units import GiB

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
CHUNK = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32, help="chunks per measurement (default 32 = 189 MB)")
    parser.add_argument("--repeat", type=int, default=9, help="timed repetitions (median reported)")
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

    # references are timed alternately with what they are the reference of (see paired())
    dst = [torch.empty_like(c) for c in chunks]
    memcpy = lambda: [d.copy_(c) for d, c in zip(dst, chunks, strict=True)]  # noqa: E731
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir)
    blobs = [c.view(torch.uint8).numpy().tobytes() for c in chunks]
    paths = [os.path.join(raw_dir, f"{i}.bin") for i in range(n)]

    # L1 through the engine: store (hash + copy into owned chunks + put), retrieve into a caller buffer
    config = Config.from_dict({"l1": {"size": 8 * GiB}})
    engine = CacheEngine(config, LAYOUT, "bench")
    l1 = engine.chain.l1
    assert l1 is not None
    out = LAYOUT.empty(n * CHUNK)
    scatter = lambda lo, hi, t: out[:, :, lo:hi].copy_(t)  # noqa: E731
    copy_s, store_s = paired(memcpy, lambda: engine.store(tokens, kv), repeat, subject_setup=l1.clear)
    engine.store(tokens, kv)
    copy2_s, retrieve_s = paired(memcpy, lambda: engine.retrieve_into(tokens, scatter), repeat)
    copy3_s, alloc_s = paired(memcpy, lambda: engine.retrieve(tokens), repeat)
    assert torch.equal(out, kv)

    # L2: the disk tier alone (framing, checksums, atomic rename), same page cache as the references
    disk = DiskTier(os.path.join(root, "l2"), 64 * GiB, LAYOUT, RawCodec())
    keys = [c.key for c in engine.chunks(tokens)]
    l2_files = [str(disk.path(k)) for k in keys]

    def clear_disk() -> None:
        for key in keys:
            disk.delete(key)

    write_s, put_s = paired(lambda: _raw_write(paths, blobs), lambda: _each_pair(disk.put, keys, chunks), repeat,
                            setup=lambda: _remove(paths), subject_setup=clear_disk)  # fmt: skip
    read_s, get_s = paired(lambda: _each(_raw_read, paths), lambda: _each(disk.get, keys), repeat)
    once_s, _ = paired(lambda: _each(_raw_read_once, paths), lambda: None, repeat)
    # the retrieve path: read, then copy into the caller's memory (vLLM's blocks, an HF cache) at once;
    # the reference reads into one reused buffer, the tier reads cached files in place (mapped.py)
    reuse, staging = torch.empty(len(blobs[0]), dtype=torch.uint8), StagingBuffer()
    sink = LAYOUT.empty(CHUNK)
    raw_out = lambda p: sink.view(-1).view(torch.uint8).copy_(_raw_read(p, reuse))  # noqa: E731
    tier_out = lambda k: sink.copy_(disk.get_into(k, staging))  # noqa: E731
    reuse_s, staged_s = paired(lambda: _each(raw_out, paths), lambda: _each(tier_out, keys), repeat)
    assert all(torch.equal(disk.get(k), c) for k, c in zip(keys, chunks, strict=True))
    # the engine's L2 retrieve (no L1): the tier's files scattered into one output, against raw
    # reads of the same bytes and the same scatter
    l2_only = {"l1": {"size": 0}, "disk": {"path": os.path.join(root, "l2"), "size": 64 * GiB}}
    l2_engine = CacheEngine(Config.from_dict(l2_only), LAYOUT, "bench")

    def raw_scatter() -> None:
        for i, path in enumerate(paths):
            part = _raw_read(path, reuse).view(LAYOUT.dtype).view(chunks[0].shape)
            out[:, :, i * CHUNK : (i + 1) * CHUNK].copy_(part)

    out.zero_()
    raw_scatter_s, engine_l2_s = paired(raw_scatter, lambda: l2_engine.retrieve_into(tokens, scatter), repeat)
    assert torch.equal(out, kv)
    l2_engine.close()
    # the same from the device: evict both sets of files from the page cache before each read
    cold_s, cold_get_s = paired(lambda: _each(_raw_read, paths), lambda: _each(disk.get, keys), repeat,
                                setup=lambda: _evict(paths), subject_setup=lambda: _evict(l2_files))  # fmt: skip
    memcpy_gbps = gbps(median([copy_s, copy2_s, copy3_s]))
    raw_read, raw_write, raw_cold = gbps(read_s), gbps(write_s), gbps(cold_s)

    lookup_rows, lookup = _lookup(repeat)
    rows: list[list[object]] = [
        ["memcpy (reference)", memcpy_gbps, 1.0, "-"],
        ["L1 store (engine.store)", gbps(store_s), copy_s / store_s, "memcpy"],
        ["L1 retrieve_into", gbps(retrieve_s), copy2_s / retrieve_s, "memcpy"],
        ["L1 retrieve (allocates)", gbps(alloc_s), copy3_s / alloc_s, "memcpy"],
        ["raw write to new files (reference)", raw_write, 1.0, "-"],
        ["L2 write (put)", gbps(put_s), write_s / put_s, "raw write"],
        ["raw read into new buffers (reference)", raw_read, 1.0, "-"],
        ["raw read, one read() per file", gbps(once_s), read_s / once_s, "raw read"],
        ["L2 read (get)", gbps(get_s), read_s / get_s, "raw read"],
        ["raw read into a reused buffer + copy out (reference)", gbps(reuse_s), 1.0, "-"],
        ["L2 staged read + copy out (get_into: retrieve path)", gbps(staged_s), reuse_s / staged_s, "raw + copy out"],
        ["raw reads + scatter into one output (reference)", gbps(raw_scatter_s), 1.0, "-"],
        ["L2 retrieve_into, engine without L1", gbps(engine_l2_s), raw_scatter_s / engine_l2_s, "raw + scatter"],
        ["raw read, not in page cache (reference)", raw_cold, 1.0, "-"],
        ["L2 read, not in page cache", gbps(cold_get_s), cold_s / cold_get_s, "raw read, not cached"],
        *lookup_rows,
    ]
    summary = {
        "chunk_mb": round(chunks[0].nbytes / 1e6, 2),
        "memcpy_gbps": round(memcpy_gbps, 2),
        "l1_retrieve_vs_memcpy": round(copy2_s / retrieve_s, 3),
        "l1_store_vs_memcpy": round(copy_s / store_s, 3),
        "l2_read_vs_raw": round(read_s / get_s, 3),
        "l2_read_vs_raw_single_read": round(once_s / get_s, 3),
        "l2_retrieve_path_vs_raw": round(reuse_s / staged_s, 3),
        "l2_engine_retrieve_vs_raw": round(raw_scatter_s / engine_l2_s, 3),
        "l2_write_vs_raw": round(write_s / put_s, 3),
        "l2_read_uncached_vs_raw": round(cold_s / cold_get_s, 3),
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


def _each_pair(fn: Any, first: list[Any], second: list[Any]) -> None:
    for a, b in zip(first, second, strict=True):
        fn(a, b)


def _each(fn: Any, items: list[Any]) -> None:
    """Call fn on each item, dropping each result before the next call.

    Reads are compared this way so that both sides reuse the same freed memory: keeping results
    would add page-fault costs that depend on the allocator's state, not on the I/O path.
    """
    for item in items:
        fn(item)


def _raw_read(path: str, reuse: torch.Tensor | None = None) -> torch.Tensor:
    """Read a whole file into a new buffer (or into `reuse`) in READ_PIECE reads, as the disk tier
    does, minus validation."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        out = torch.empty(size, dtype=torch.uint8) if reuse is None else reuse[:size]
        view = out.numpy().data
        got = 0
        while got < size:
            got += f.readinto(view[got : got + READ_PIECE])
    return out


if __name__ == "__main__":
    main()
