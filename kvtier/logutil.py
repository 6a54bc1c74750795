"""Logging helpers: one logger tree under "kvtier", and rate-limited logging of error bursts."""

from __future__ import annotations

import logging
import threading
import time

STARTUP = "kvtier.startup"  # one-time summaries of what a start-up set up: shown unless log_level is error


def setup_logging(level: str = "warning") -> None:
    """Attach a stderr handler to the "kvtier" logger once, at `level`; the start-up logger logs at
    info unless `level` is stricter than warning."""
    logger = logging.getLogger("kvtier")
    logger.setLevel(level.upper())
    strict = logging.getLevelName(level.upper()) > logging.WARNING
    logging.getLogger(STARTUP).setLevel(level.upper() if strict else "INFO")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


class BurstLog:
    """Logs the first of a burst of similar errors, then at most one summary per `interval` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock=time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, what: str, msg: str, *args: object) -> None:
        """Log `msg` unless `what` was logged less than `interval` seconds ago (then count it)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(what)
            if last is not None and now - last < self._interval:
                self._suppressed[what] = self._suppressed.get(what, 0) + 1
                return
            self._last[what] = now
            suppressed = self._suppressed.pop(what, 0)
        if suppressed:
            msg += f" ({suppressed} similar since the last report)"
        self._logger.warning(msg, *args)
