"""A circuit breaker: after a failure, calls are refused at once for a pause that doubles per failure.

A remote that is down must cost a request nothing: instead of each call waiting for its timeout, the
first failure opens the breaker for `first` seconds; the next call after the pause is a trial, and
each failed trial doubles the pause up to `most`. One success closes the breaker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Breaker:
    """Decides whether a remote may be called now."""

    def __init__(self, first: float, most: float, clock: Callable[[], float] = time.monotonic) -> None:
        if first <= 0 or most < first:
            raise ValueError(f"need 0 < first <= most, got first={first}, most={most}")
        self.first = first
        self.most = most
        self._clock = clock
        self._pause = 0.0  # 0 while closed
        self._until = 0.0  # calls are refused before this time
        self._lock = threading.Lock()
        self.opened = 0  # times the breaker went from closed to open (a failure burst)

    @property
    def is_open(self) -> bool:
        """True while calls are refused."""
        return self._clock() < self._until

    def allow(self) -> bool:
        """Whether a call may go ahead now (closed, or the pause is over: a trial)."""
        return self._clock() >= self._until

    def success(self) -> None:
        """A call succeeded: close the breaker."""
        if self._pause:
            with self._lock:
                self._pause = 0.0
                self._until = 0.0

    def failure(self) -> float:
        """A call failed: open (or keep open) the breaker; return the pause in force.

        Only the first failure and failed trials (calls allowed after a pause ended) set a pause;
        calls that were already in flight when the breaker opened fail without doubling it, so N
        concurrent requests to a hung remote cost one pause of `first`, not `first * 2**(N-1)`.
        """
        with self._lock:
            now = self._clock()
            if not self._pause:
                self.opened += 1
                self._pause = self.first
            elif now >= self._until:  # a trial failed
                self._pause = min(self.most, self._pause * 2)
            else:  # began before the breaker opened: that failure is already counted
                return self._pause
            self._until = now + self._pause
            return self._pause
