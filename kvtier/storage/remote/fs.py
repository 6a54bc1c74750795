"""A shared filesystem (NFS, CephFS, a mounted volume) as a remote tier: one file per object.

    fs:///mnt/shared/kvtier

Files are laid out like the disk tier's (`<root>/<namespace>/<digest[:2]>/<digest>.kv`, so
`kvtier inspect` reads both) and written to a temporary name unique to host, process and call, then
renamed into place: readers on any machine see a whole object or none, and concurrent writers of
one key each leave a complete object. There is no byte budget: the share's owner bounds it. Calls run
on a small thread pool so that a hung mount costs a caller its deadline, not a stuck request.
A get checks a file's size (fstat of the open file) against `max_object` before allocating anything,
then reads at most that many bytes into one buffer of that size.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import SplitResult

import numpy as np

from kvtier.errors import ConfigError, TierError
from kvtier.keys import ChunkKey
from kvtier.storage.files import object_path, unlink_if_present, write_atomic
from kvtier.storage.remote.store import Buffer, StoreOptions

T = TypeVar("T")


class FsStore:
    """Framed objects as files under a shared directory."""

    def __init__(self, url: SplitResult, options: StoreOptions) -> None:
        self.scheme = "fs"
        self.root = url.path
        self.where = f"fs://{self.root}"
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"remote.url: cannot create {self.root}: {exc.strerror or exc}") from exc
        self._tmp_tag = f"{socket.gethostname()}.{os.getpid()}"
        self.max_object = options.max_object
        self._pool = ThreadPoolExecutor(options.max_connections, thread_name_prefix="kvtier-fs")

    def _path(self, key: ChunkKey) -> str:
        return object_path(self.root, key)

    def _run(self, timeout: float, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result(timeout=timeout)  # TimeoutError when the mount hangs

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        def leading() -> list[bool]:
            out = [False] * len(keys)
            for i, key in enumerate(keys):
                if not os.path.isfile(self._path(key)):
                    break
                out[i] = True
            return out

        return self._run(timeout, leading)

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        return self._run(timeout, lambda: [_read(self._path(k), self.max_object) for k in keys])

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        buffers = [memoryview(part).cast("B") for part in parts]
        self._run(timeout, lambda: write_atomic(self._path(key), buffers, False, self._tmp_tag))

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        return self._run(timeout, lambda: unlink_if_present(self._path(key)))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read(path: str, max_object: int) -> memoryview | None:
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_object:
                raise TierError(f"{path} is {size} bytes, over remote max_object ({max_object} bytes)")
            view = np.empty(size, dtype=np.uint8).data  # not zero-filled first, as a bytearray is
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break  # truncated under us: the framing check rejects it
                got += n
            return view if got == size else view[:got]
    except FileNotFoundError:
        return None


def open_store(url: SplitResult, options: StoreOptions) -> FsStore:
    """Factory registered for fs://."""
    return FsStore(url, options)
