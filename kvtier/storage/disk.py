"""L2: canonical chunk tensors as framed files in a local directory (the machinery is FileTier's).

On the retrieve path (`get_into`, `get_many_into`: the caller copies each chunk out at once), a file
whose pages are all in the page cache is mapped and validated in place (mapped.py). When the page
cache holds a file in 4 KiB pages (it was evicted and read again), most of the cost of such a read
is kernel work per page: filling the mapping's page tables and, later, tearing them down.
`get_many_into` therefore maps and validates a window of files ahead on a few threads (page tables
filled by one madvise call, the xxh3 checksum of large buffers: both run without the GIL), then
hands the chunks over in order; the mappings stay held by the caller's staging buffer, which the
engine releases off the request path. Files written recently sit in large folios that the kernel
maps in 2 MiB steps: there the window costs a little (the copy out reads memory again instead of
the cache the checksum just filled).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from kvtier.codec import Codec
from kvtier.codec.framing import (
    HEADER_SIZE,
    Header,
    check_digest,
    check_header,
    decode_payload,
    encode_object,
    parse_header,
    validate_object,
)
from kvtier.errors import CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.storage.filetier import FileTier, read_hashed
from kvtier.storage.mapped import map_if_cached
from kvtier.storage.staging import StagingBuffer

_T = TypeVar("_T")

# Chunks validated ahead by `get_many_into` before the first is handed over. Validation and the
# caller's copy are both memory-bound: run side by side on two cores they slow each other down
# (measured), so a window is validated whole, then copied out.
VALIDATE_AHEAD = 32
# Cost of mapping a file (cachestat, mmap, page tables filled, missing pages read in) above which
# validating ahead on threads pays: files the page cache holds in 4 KiB pages cost ~130 us/MB here,
# partly evicted ones more, recently written ones (large folios) ~5-20.
SLOW_MAP_US_PER_MB = 50.0


def _done(fn: Callable[[ChunkKey], _T], key: ChunkKey) -> Future[_T]:
    """fn(key), run now, as a completed future."""
    future: Future[_T] = Future()
    try:
        future.set_result(fn(key))
    except Exception as exc:
        future.set_exception(exc)
    return future


class DiskTier(FileTier):
    """Canonical chunk tensors, framed with `layout` and `codec`, in files under `root`.

    `get` returns memory of its own. `get_into` and `get_many_into` (the retrieve path, whose
    caller copies each chunk out at once) read a file whose pages are in the page cache in place
    (mapped.py): the tensor is then a private view of the file's pages, unmapped with its last
    view; `get_many_into` also has the staging buffer hold the mappings until it is released (the
    engine releases them after the request's prefill).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity: int,
        layout: KVLayout,
        codec: Codec,
        policy: str = "lru",
        fsync: bool = False,
        name: str = "l2",
    ) -> None:
        self.layout = layout
        self.codec = codec
        # threads (started on first use) that map and validate files ahead of the reader: page tables
        # fill in one system call and xxh3 hashes large buffers, both without the GIL
        self._validators = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), "kvtier-validate")
        self._map_us_per_mb = 0.0  # moving estimate; starts one by one, goes ahead once mapping is slow
        super().__init__(root, capacity, policy, fsync, name)

    def get_many_into(self, keys: Sequence[ChunkKey], staging: StagingBuffer) -> Iterator[torch.Tensor]:
        """get_into() for each of `keys` in order, up to the first miss. While mapping files costs
        what 4 KiB pages cost, files are mapped and validated on the tier's threads first,
        `VALIDATE_AHEAD` at a time; otherwise one by one, each copied out while still in the cache."""
        device = self._decode_device(staging)
        lo = 0
        while lo < len(keys):
            ahead = self._map_us_per_mb > SLOW_MAP_US_PER_MB
            window = keys[lo : lo + (VALIDATE_AHEAD if ahead else 1)]
            lo += len(window)
            if ahead:
                checks = [self._validators.submit(self._map_validated, key) for key in window]
                wait(checks)
            else:
                checks = [_done(self._map_validated, window[0])]
            for key, check in zip(window, checks, strict=True):
                kv = self._take(key, check, staging, device)
                if kv is None:
                    return
                yield kv

    def _map_validated(self, key: ChunkKey) -> tuple[memoryview, Header] | None:
        """`key`'s file mapped (page tables filled) and validated, if it is (mostly) in the page
        cache; None otherwise; CorruptObjectError if it is corrupt."""
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                began = time.perf_counter()
                # page tables filled, a mostly cached file's missing pages read in; None if unreadable
                mapped = map_if_cached(f.fileno(), size, populated=True)
        except OSError:
            return None  # the sequential read meets the error again and accounts for it
        if mapped is None:
            return None
        self._sample_map_cost(size, time.perf_counter() - began)  # what that cost tells how the file is held
        return mapped, validate_object(mapped, key, self.layout, self.codec)

    def _sample_map_cost(self, size: int, seconds: float) -> None:
        """Fold one mapping (its page-table fill, and any missing pages read in) into the moving
        estimate (chunks under 1 MiB say too little)."""
        if size < 1 << 20:
            return
        cost = seconds * 1e12 / size  # microseconds per MB
        self._map_us_per_mb += 0.25 * (cost - self._map_us_per_mb)  # (racy between threads: an estimate)

    def _take(
        self,
        key: ChunkKey,
        check: Future[tuple[memoryview, Header] | None],
        staging: StagingBuffer,
        device: torch.device | None,
    ) -> torch.Tensor | None:
        """`key`'s chunk as validated ahead, or read now; accounted as a hit, or None for a miss."""
        try:
            checked = check.result()
        except CorruptObjectError as exc:
            self._missed(key, self._path(key), exc)
            return None
        if checked is None:  # not mapped: read() it, or account for the miss
            return self._get(key, staging)
        mapped, header = checked
        try:
            kv = decode_payload(header, mapped, self.codec, device)
        except CorruptObjectError as exc:  # a payload that checks out but does not decode
            self._missed(key, self._path(key), exc)
            return None
        staging.hold(mapped)
        return self._hit(key, len(mapped), kv)

    def close(self) -> None:
        self._validators.shutdown(wait=True)
        super().close()

    def _encode(self, key: ChunkKey, kv: torch.Tensor) -> list[memoryview]:
        header, payload = encode_object(key, self.layout, self.codec, kv)
        return [memoryview(header), payload.cast("B")]

    def _read(self, path: str, key: ChunkKey, staging: StagingBuffer | None) -> tuple[torch.Tensor, int]:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            device = self._decode_device(staging)
            if staging is not None:  # the caller copies the tensor out at once: read a cached file in place
                mapped = map_if_cached(f.fileno(), size)
                if mapped is not None:
                    header = validate_object(mapped, key, self.layout, self.codec)
                    return decode_payload(header, mapped, self.codec, device), size
            header = parse_header(f.read(HEADER_SIZE))
            check_header(header, key, self.layout, self.codec)
            if size != HEADER_SIZE + header.payload_len:
                raise CorruptObjectError(f"file is {size} bytes, header says {HEADER_SIZE + header.payload_len}")
            if staging is None:
                payload = torch.empty(header.payload_len, dtype=torch.uint8)
            else:
                payload = staging.take(header.payload_len)
            view = payload.numpy().data
            digest = read_hashed(f, view)
        check_digest(header, digest)
        return self.codec.decode(view, header.shape, header.dtype, header.params, device), size

    def _decode_device(self, staging: StagingBuffer | None) -> torch.device | None:
        """Where to decode: the caller's device for a compressing codec read on the request path;
        the CPU otherwise (raw "decoding" on a GPU would be a copy from pageable memory, which the
        caller's scatter does as well; promotions into L1 stay on the CPU)."""
        if staging is None or staging.device is None or staging.device.type == "cpu" or self.codec.name == "raw":
            return None
        return staging.device
