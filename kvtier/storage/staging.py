"""Reusable read buffers for the retrieve path.

Reading a chunk into freshly allocated memory costs more than the read itself: every new page is
faulted in and zeroed by the kernel (~2.5 GB/s here, against ~15 GB/s for a copy into memory that
is already mapped). On the retrieve path the caller copies each chunk into its own memory at once
(vLLM's paged blocks, a transformers cache), so tiers that can read into a caller's buffer
(`StagedReader`) read into a `StagingBuffer` reused from chunk to chunk, and the chain promotes
those chunks into L1 later, off the request path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from kvtier.keys import ChunkKey


class StagingBuffer:
    """One growable byte buffer, reused read after read; also lists the keys read through it."""

    __slots__ = ("_buf", "device", "held", "read_keys")

    def __init__(self, device: torch.device | None = None) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)
        self.read_keys: list[ChunkKey] = []  # chunks read into the buffer and not promoted yet
        # where the caller's memory lives: compressed chunks are decoded there (on a GPU, only the
        # compressed bytes cross PCIe); None is the CPU
        self.device = device
        # what the tensors read through the buffer were views of (mapped files): released when the
        # caller is done, or handed on (`take_held`) to be released later, off the request path
        self.held: list[object] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of the buffer (grown if needed): valid until the next take()."""
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def hold(self, obj: object) -> None:
        """Keep `obj` alive until the buffer is released (or `take_held` hands it on)."""
        self.held.append(obj)

    def take_held(self) -> list[object]:
        """What the buffer holds, now the caller's to release."""
        held, self.held = self.held, []
        return held


class StagingPool:
    """Staging buffers for concurrent retrieves: one per retrieve in flight, kept for reuse."""

    def __init__(self, keep: int = 4) -> None:
        self._free: list[StagingBuffer] = []
        self._keep = keep
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def buffer(self, device: torch.device | None = None) -> Iterator[StagingBuffer]:
        """A buffer for the duration of the block, for a caller whose memory is on `device`."""
        with self._lock:
            buf = self._free.pop() if self._free else StagingBuffer()
        buf.device = device
        try:
            yield buf
        finally:
            buf.read_keys = []
            buf.held = []
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(buf)
