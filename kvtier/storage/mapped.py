"""Zero-copy reads of files whose pages are all in the page cache.

A read() of a cached file copies its pages into the caller's memory, and validation then reads that
memory again: two passes over every byte before the caller's own copy (into vLLM's paged blocks,
a transformers cache) makes a third. Mapping the file instead lets the checksum read the cached
pages where they are and the caller copy straight out of them: one pass saved, and the staging
buffer no longer written at all.

Mapped memory turns a read error into SIGBUS instead of an OSError, so a file is mapped only when
`cachestat(2)` (Linux 6.5+) reports every page of it cached: validating it then touches no device,
and the caller copies out of the mapping right after, while those pages are still hot. Anywhere
else (older kernels, other systems, a file partly evicted), callers fall back to read().

The mapping is private and copy-on-write: writing into the returned memory never reaches the file.
kvtier never truncates or rewrites a file in place (writes are temporary files renamed into
place; eviction unlinks, which leaves a mapping valid), so what was validated stays what the caller
reads, unless something outside kvtier truncates files in the cache directory while they are
being read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import platform
import sys

log = logging.getLogger("kvtier.storage.mapped")

_SYS_CACHESTAT = 451  # in the unified table of system calls added since Linux 5.1; alpha and MIPS number apart


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _CacheStat:
    """cachestat(2) through libc's syscall(); `available` turns False for good on the first ENOSYS."""

    def __init__(self) -> None:
        self.available = False
        if not sys.platform.startswith("linux") or platform.machine().startswith(("alpha", "mips")):
            return
        name = ctypes.util.find_library("c")
        if name is None:
            return
        try:
            self._syscall = ctypes.CDLL(name, use_errno=True).syscall
        except (OSError, AttributeError):
            return
        self._syscall.restype = ctypes.c_long
        self.available = True
        self.available = self._probe()

    def _probe(self) -> bool:
        """Whether the kernel answers at all (Linux 6.5+, not forbidden by a seccomp filter)."""
        try:
            fd = os.open(sys.executable, os.O_RDONLY)
        except OSError:
            return False
        try:
            return self.cached_pages(fd, 1) is not None
        finally:
            os.close(fd)

    def cached_pages(self, fd: int, length: int) -> int | None:
        """Pages of the first `length` bytes of `fd` in the page cache; None if the kernel cannot say."""
        if not self.available:
            return None
        rng, stat = _Range(0, length), _Stat()
        if self._syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) == 0:
            return int(stat.cache)
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter that forbids it
            log.debug("cachestat(2) unavailable (%s): disk reads copy through read()", errno.errorcode.get(err, err))
            self.available = False
        return None


_CACHESTAT = _CacheStat()


def map_if_cached(fd: int, size: int) -> memoryview | None:
    """A private, writable (copy-on-write) mapping of the first `size` bytes of `fd` if every one
    of their pages is in the page cache; None otherwise (the caller reads with read())."""
    if size <= 0:
        return None
    pages = -(-size // mmap.PAGESIZE)
    if _CACHESTAT.cached_pages(fd, size) != pages:
        return None
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    return memoryview(mapping)
