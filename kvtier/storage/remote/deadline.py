"""Deadlines for client calls that a socket timeout alone does not bound.

A call to a Redis Cluster or through Sentinel may take several socket timeouts in a row: redis-py
re-sends a timed-out pipeline's commands one by one and refreshes the topology after each failure,
and asks each sentinel in turn for the master. Running such calls on worker threads lets the caller
give up at its deadline; the abandoned call finishes (or times out) in the background, holding one
worker, while the tier's breaker keeps further calls away.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlinePool:
    """Worker threads that run blocking calls; a caller waits for one at most its deadline."""

    def __init__(self, workers: int, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)

    def run(self, timeout: float, fn: Callable[[], T]) -> T:
        """The result of `fn()`, or TimeoutError if it is not done within `timeout` seconds."""
        future = self._pool.submit(fn)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # still queued behind hung calls: it must not run after its caller gave up
            raise TimeoutError(f"no answer within {timeout * 1e3:.0f} ms") from None

    def close(self) -> None:
        """Stop taking calls; calls still running finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)
