"""L2 machinery: framed objects as files in a local directory; survives restarts, shareable between processes.

Layout: `<root>/<namespace hex>/<digest hex[:2]>/<digest hex>.kv`, each file a framed object
(header + payload, see codec/framing.py). Writes go to a unique temporary file that is renamed into
place, so readers never see a partial object, even with several processes on one directory. Each
process keeps its own index (rebuilt by scanning at start, and extended when it finds a file another
process wrote) and evicts to its own byte budget.

Two tiers share that machinery (`FileTier`) and differ only in what a value is:
- `DiskTier` (disk.py) holds canonical chunk tensors; it frames them with a layout and a codec, and
  decodes them.
- `ObjectDiskTier` (objects.py) holds already-framed objects (uint8 tensors of header + payload, e.g.
  what the kvtier server receives); it writes their bytes as they are and, on read, validates the
  framing itself.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvtier.codec.framing import payload_hasher
from kvtier.errors import CodecError, ConfigError, CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.logutil import BurstLog
from kvtier.storage.base import TierListener, TierStats
from kvtier.storage.files import object_path, parse_name, unlink_if_present, write_atomic
from kvtier.storage.policy import EvictionPolicy, make_policy
from kvtier.storage.staging import StagingBuffer

log = logging.getLogger("kvtier.storage.disk")
STALE_TMP_SECONDS = 3600.0  # a temporary file this old belongs to a writer that died
READ_PIECE = 1024 * 1024  # bytes read, then hashed while still in the CPU cache (best of 64 KiB-1 MiB measured)


class FileTier:
    """Framed objects in files under `root`, at most `capacity` bytes known to this process.

    Subclasses say what a value is: `_encode` turns one into the buffers of its file, `_read` reads
    and validates a file back into a value and says the file's size.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity: int,
        policy: str = "lru",
        fsync: bool = False,
        name: str = "l2",
    ) -> None:
        self.name = name
        self.root = Path(root).expanduser()
        self._root = str(self.root)
        self.capacity = capacity
        self.fsync = fsync
        self.stats = TierStats()
        self._policy: EvictionPolicy[ChunkKey] = make_policy(policy)
        self._sizes: dict[ChunkKey, int] = {}
        self._reserved = 0
        self._lock = threading.RLock()
        self._burst = BurstLog(log)
        self.listeners: list[TierListener] = []  # told of keys indexed and unindexed (KV events)
        _ensure_writable(self.root)
        self._scan()

    # --- paths and index -------------------------------------------------------------------------

    def path(self, key: ChunkKey) -> Path:
        """The file that holds `key`."""
        return Path(self._path(key))

    def _path(self, key: ChunkKey) -> str:
        return object_path(self._root, key)

    def _scan(self) -> None:
        """Index the objects already in the directory, oldest first, and drop stale temp files."""
        found: list[tuple[float, ChunkKey, int]] = []
        now = time.time()
        for ns_dir in _subdirs(self.root):
            for shard in _subdirs(ns_dir):
                for entry in os.scandir(shard):
                    if entry.name.endswith(".tmp"):
                        _remove_stale(entry, now)
                        continue
                    key = parse_name(ns_dir.name, entry.name)
                    if key is not None and entry.is_file():
                        st = entry.stat()
                        found.append((st.st_mtime, key, st.st_size))
        found.sort(key=lambda item: item[0])
        with self._lock:
            for _, key, size in found:
                self._index(key, size)
            self._make_room(0)
        if found:
            log.info("%s: found %d objects (%d bytes) in %s", self.name, len(found), self.stats.bytes, self.root)

    def _index(self, key: ChunkKey, size: int) -> None:
        self._sizes[key] = size
        self._policy.insert(key)
        self.stats.bytes += size
        self.stats.objects += 1
        for listener in self.listeners:
            listener(self.name, True, key)

    def _unindex(self, key: ChunkKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._policy.remove(key)
            self.stats.bytes -= size
            self.stats.objects -= 1
            for listener in self.listeners:
                listener(self.name, False, key)

    def _make_room(self, nbytes: int) -> bool:
        """Evict until `nbytes` more fit in the budget (under the lock)."""
        if nbytes > self.capacity:
            return False
        while self.stats.bytes + self._reserved + nbytes > self.capacity:
            victim = next(iter(self._policy.victims()), None)
            if victim is None:
                return False
            self._unindex(victim)
            unlink_if_present(self.path(victim))
            self.stats.evictions += 1
        return True

    def _adopt(self, key: ChunkKey) -> bool:
        """Index a file another process wrote; False if there is none."""
        try:
            size = self.path(key).stat().st_size
        except OSError:
            return False
        with self._lock:
            if key not in self._sizes and self._make_room(size):
                self._index(key, size)
        return key in self._sizes

    # --- the Tier protocol -----------------------------------------------------------------------

    def contains(self, key: ChunkKey) -> bool:
        return key in self._sizes or self._adopt(key)

    def prefix_len(self, keys: Sequence[ChunkKey]) -> int:
        for i, key in enumerate(keys):
            if not self.contains(key):
                return i
        return len(keys)

    def get(self, key: ChunkKey) -> torch.Tensor | None:
        return self._get(key, None)

    def get_into(self, key: ChunkKey, staging: StagingBuffer) -> torch.Tensor | None:
        return self._get(key, staging)

    def _get(self, key: ChunkKey, staging: StagingBuffer | None) -> torch.Tensor | None:
        path = self._path(key)
        try:
            kv, size = self._read(path, key, staging)
        except (OSError, CorruptObjectError) as exc:
            self._missed(key, path, exc)
            return None
        return self._hit(key, size, kv)

    def _missed(self, key: ChunkKey, path: str, exc: OSError | CorruptObjectError) -> None:
        """Account for a read of `key` that failed with `exc`; drop what is gone or corrupt."""
        self.stats.misses += 1
        if isinstance(exc, FileNotFoundError):
            with self._lock:
                self._unindex(key)  # evicted by another process sharing the directory
        elif isinstance(exc, CorruptObjectError):
            self._burst.warning("corrupt", "%s: deleting corrupt object %s: %s", self.name, path, exc)
            self.stats.corrupt += 1
            self._drop(key, path)
        else:
            self._burst.warning("read", "%s: cannot read %s: %s", self.name, path, exc)
            self.stats.errors += 1

    def _hit(self, key: ChunkKey, size: int, kv: torch.Tensor) -> torch.Tensor:
        """Account for `kv`, read from `key`'s file of `size` bytes; return it."""
        with self._lock:
            if key in self._sizes:
                self._policy.touch(key)
            elif self._make_room(size):
                self._index(key, size)
        self.stats.hits += 1
        self.stats.bytes_read += kv.nbytes
        return kv

    def _read(self, path: str, key: ChunkKey, staging: StagingBuffer | None) -> tuple[torch.Tensor, int]:
        """The validated value in file `path` (read into `staging` if given) and the file's size;
        CorruptObjectError (or OSError) otherwise."""
        raise NotImplementedError

    def _encode(self, key: ChunkKey, kv: torch.Tensor) -> list[memoryview]:
        """The bytes of `kv`'s file, as buffers written back to back."""
        raise NotImplementedError

    def put(self, key: ChunkKey, kv: torch.Tensor) -> bool:
        if key in self._sizes:
            with self._lock:
                if key in self._sizes:
                    self._policy.touch(key)
            return True
        try:
            buffers = self._encode(key, kv)
        except CodecError as exc:
            self._burst.warning("encode", "%s: cannot store %s: %s", self.name, key, exc)
            self.stats.put_failures += 1
            return False
        size = sum(b.nbytes for b in buffers)
        with self._lock:
            if not self._make_room(size):
                self.stats.put_failures += 1
                return False
            self._reserved += size
        try:
            self._write(self.path(key), buffers)
        except OSError as exc:
            what = "disk full" if exc.errno == errno.ENOSPC else "write failed"
            self._burst.warning(what, "%s: %s for %s: %s", self.name, what, key, exc)
            self.stats.errors += 1
            self.stats.put_failures += 1
            return False
        finally:
            with self._lock:
                self._reserved -= size
        with self._lock:
            if key not in self._sizes:
                self._index(key, size)
            self.stats.puts += 1
            self.stats.bytes_written += kv.nbytes
        return True

    def _write(self, path: Path, buffers: list[memoryview]) -> None:
        write_atomic(str(path), buffers, self.fsync, str(os.getpid()))

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            known = key in self._sizes
            self._unindex(key)
        return unlink_if_present(self.path(key)) or known

    def _drop(self, key: ChunkKey, path: str | Path) -> None:
        with self._lock:
            self._unindex(key)
        unlink_if_present(path)

    def held_keys(self) -> list[ChunkKey]:
        """A snapshot of the keys this process knows."""
        with self._lock:
            return list(self._sizes)

    def close(self) -> None:
        pass

    def check(self) -> None:
        with self._lock:
            assert sum(self._sizes.values()) == self.stats.bytes, (sum(self._sizes.values()), self.stats.bytes)
            assert self.stats.bytes <= self.capacity, (self.stats.bytes, self.capacity)
            assert len(self._sizes) == self.stats.objects == len(self._policy)
            assert self._reserved == 0
            for key, size in self._sizes.items():
                assert self.path(key).stat().st_size == size, key


def _ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"kvtier")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"disk.path: {root} is not a writable directory: {exc.strerror or exc}") from exc


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _remove_stale(entry: os.DirEntry[str], now: float) -> None:
    try:
        if now - entry.stat().st_mtime > STALE_TMP_SECONDS:
            os.unlink(entry.path)
    except OSError:
        pass  # another process finished or removed it first: nothing left to clean


def read_hashed(f: io.FileIO, view: memoryview) -> bytes:
    """Fill `view` from `f`, hashing each piece while it is still in the CPU cache; the xxh3-128 digest."""
    hasher = payload_hasher()
    got, length = 0, len(view)
    while got < length:
        n = f.readinto(view[got : got + READ_PIECE])
        if not n:
            raise CorruptObjectError(f"file ended after {got} of {length} payload bytes")
        hasher.update(view[got : got + n])
        got += n
    return hasher.digest()
