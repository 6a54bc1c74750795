"""Asynchronous writes to a lower tier: a bounded queue drained by one thread.

A store never blocks the request that made it: when the queue is full, the oldest pending write
is dropped (its job says so) and counted. Every job ends with a status and, on failure, a reason.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvtier.keys import ChunkKey
from kvtier.storage.base import Tier

log = logging.getLogger("kvtier.storage.writer")


class JobStatus(Enum):
    PENDING = "pending"
    STORED = "stored"  # the tier now holds the chunk
    PRESENT = "present"  # the tier already held it; nothing written
    DROPPED = "dropped"  # evicted from a full queue before it ran
    FAILED = "failed"  # the tier refused or failed; see reason


@dataclass(slots=True)
class WriteJob:
    """One pending write of a chunk to one tier."""

    key: ChunkKey
    kv: torch.Tensor | None
    status: JobStatus = JobStatus.PENDING
    reason: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, status: JobStatus, reason: str = "") -> None:
        self.status, self.reason, self.kv = status, reason, None
        self.done.set()


@dataclass(slots=True)
class WriterStats:
    submitted: int = 0
    stored: int = 0
    present: int = 0
    dropped: int = 0
    failed: int = 0


class AsyncWriter:
    """Writes chunks to `tier` in a background thread, at most `max_pending` queued."""

    def __init__(self, tier: Tier, max_pending: int) -> None:
        self.tier = tier
        self.max_pending = max_pending
        self.stats = WriterStats()
        self._queue: collections.deque[WriteJob] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0  # jobs taken off the queue and not finished
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kvtier-writer-{tier.name}", daemon=True)
        self._thread.start()

    def submit(self, key: ChunkKey, kv: torch.Tensor) -> WriteJob:
        """Queue a write; never blocks. The oldest queued job is dropped when the queue is full."""
        job = WriteJob(key, kv)
        with self._cond:
            if self._closed:
                job.finish(JobStatus.DROPPED, "writer closed")
                return job
            self.stats.submitted += 1
            if len(self._queue) >= self.max_pending:
                oldest = self._queue.popleft()
                oldest.finish(JobStatus.DROPPED, "write queue full")
                self.stats.dropped += 1
                log.debug("%s: write queue full, dropped %s", self.tier.name, oldest.key)
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._running += 1
            try:
                self._write(job)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _write(self, job: WriteJob) -> None:
        assert job.kv is not None
        try:
            if self.tier.contains(job.key):
                job.finish(JobStatus.PRESENT)
                self.stats.present += 1
            elif self.tier.put(job.key, job.kv):
                job.finish(JobStatus.STORED)
                self.stats.stored += 1
            else:
                job.finish(JobStatus.FAILED, f"{self.tier.name} refused the chunk (see its stats)")
                self.stats.failed += 1
        except Exception as exc:  # a tier must not raise, but one bug must not kill the writer thread
            log.exception("%s: write of %s raised", self.tier.name, job.key)
            job.finish(JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
            self.stats.failed += 1

    @property
    def pending(self) -> int:
        """Jobs queued or being written."""
        with self._cond:
            return len(self._queue) + self._running

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._running, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued writes, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.finish(JobStatus.DROPPED, "writer closed")
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
