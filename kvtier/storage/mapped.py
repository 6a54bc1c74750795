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
being read. A mapping holds no file descriptor (Python's mmap keeps a duplicate open per mapping
until 3.13; these are made with libc's mmap and unmapped when the last view of them is dropped),
so a reader may hold many of them, e.g. until its request's prefill is over.
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
import weakref

log = logging.getLogger("kvtier.storage.mapped")

_SYS_CACHESTAT = 451  # in the unified table of system calls added since Linux 5.1; alpha and MIPS number apart
_MADV_POPULATE_READ = 22  # Linux 5.14+
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _Kernel:
    """cachestat(2), mmap(2), munmap(2) and madvise(2) through libc; `available` is False where
    cachestat is missing (then nothing is mapped) and turns False for good on the first ENOSYS."""

    def __init__(self) -> None:
        self.available = False
        self.can_populate = False
        if not sys.platform.startswith("linux") or platform.machine().startswith(("alpha", "mips")):
            return
        name = ctypes.util.find_library("c")
        if name is None:
            return
        try:
            libc = ctypes.CDLL(name, use_errno=True)  # CDLL calls run without the GIL
            self._syscall, self._mmap, self._munmap, self._madvise = libc.syscall, libc.mmap, libc.munmap, libc.madvise
        except (OSError, AttributeError):
            return
        self._syscall.restype = ctypes.c_long
        self._mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self._mmap.restype = ctypes.c_void_p
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.available = True
        self.available = self.can_populate = self._probe()

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

    def map(self, fd: int, size: int) -> memoryview | None:
        """A private, writable mapping of `size` bytes of `fd`, unmapped once no view of it is left."""
        address = self._mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if address is None or address == _MAP_FAILED:
            return None
        memory = (ctypes.c_char * size).from_address(address)
        # not at interpreter exit: a daemon thread may still read a view then; the OS unmaps it
        weakref.finalize(memory, self._munmap, address, size).atexit = False
        return memoryview(memory).cast("B")

    def populate(self, view: memoryview) -> bool:
        """Fill the page tables of a mapping in one call, reading pages not in the page cache from
        the device; False only if that failed (a page that would SIGBUS on access: an error here
        instead). Where the kernel cannot (before Linux 5.14), pages fault in on first use: True."""
        if not self.can_populate or not len(view):
            return True
        cell = ctypes.c_char.from_buffer(view)
        address = ctypes.addressof(cell)
        del cell
        if self._madvise(address, len(view), _MADV_POPULATE_READ) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # before Linux 5.14
            self.can_populate = False
            return True
        return False


_KERNEL = _Kernel()


def map_if_cached(fd: int, size: int, populated: bool = False) -> memoryview | None:
    """A private, writable (copy-on-write) mapping of the first `size` bytes of `fd` if every one
    of their pages is in the page cache; None otherwise (the caller reads with read()). It stays
    valid after `fd` is closed, and is unmapped when the last view of it is dropped.

    With `populated`, a file mostly in the page cache (half its pages or more) is mapped too, and
    its page tables are filled now (`populate`), the missing pages read from the device by that
    call: a failure is then a None here rather than a SIGBUS later. (DAMON-style reclaim evicts
    a few pages of idle files; reading the whole file again for them costs more than faulting them.)"""
    if size <= 0:
        return None
    pages = -(-size // mmap.PAGESIZE)
    cached = _KERNEL.cached_pages(fd, size)
    if cached is None:
        return None
    if cached != pages and (not populated or not _KERNEL.can_populate or cached * 2 < pages):
        return None
    view = _KERNEL.map(fd, size)
    if view is None or (populated and not _KERNEL.populate(view)):
        return None  # a page that cannot be read (evicted since, then an I/O error): read() reports it
    return view


def populate(view: memoryview) -> bool:
    """Map every page of `view` (from `map_if_cached`) now, in one system call that several threads
    can make at once (without the GIL), instead of one page fault per 64 KiB on first touch; False
    if a page could not be read (True, doing nothing, where the kernel cannot: before Linux 5.14).
    On files whose page cache is in 4 KiB pages (re-read after eviction), this is most of the cost
    of validating a mapped object."""
    return _KERNEL.populate(view)
