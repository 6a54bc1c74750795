"""The instance side of a cluster: register with the controller, heartbeat, ship KV events, resync.

One daemon thread does it all, so requests to the controller never run on a serving thread.
Events are taken from the EventBatcher every `flush_ms`; a batch that cannot be delivered is put
back and sent again with the same number. The controller answers `resync` after a gap (or when it
lost track), and `unknown` when it does not know the instance (it restarted): the agent then
registers again and sends a snapshot of the keys its tiers hold. A controller that is down costs
the serving engine nothing: events pile up to `max_events`, then a snapshot replaces them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from kvtier.cluster.app import TOKEN_ENV
from kvtier.cluster.client import MAX_STATUS_ANSWER, ControllerClient, ControllerUnavailable
from kvtier.cluster.events import TIER_CODES, EventBatcher, encode_keys
from kvtier.cluster.state import OK, RESYNC, UNKNOWN, Registration
from kvtier.config import ClusterConfig
from kvtier.keys import ChunkKey
from kvtier.logutil import BurstLog
from kvtier.storage.base import TierListener
from kvtier.tls import ClientTLS

log = logging.getLogger("kvtier.cluster.agent")


class ReportingTier(Protocol):
    """A tier that reports its keys (CPUTier, DiskTier)."""

    name: str
    listeners: list[TierListener]

    def held_keys(self) -> list[ChunkKey]: ...


class ClusterAgent:
    """Keeps the controller's view of this instance's tiers up to date, from a background thread."""

    def __init__(
        self,
        config: ClusterConfig,
        reg: Registration,
        tiers: Sequence[ReportingTier],
        stats: Callable[[], dict[str, float]] | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        """`tls`: how to check an https:// controller's certificate (Config.tls's ca and verify)."""
        assert config.controller_url is not None
        self.config = config
        self.reg = reg
        self.tiers = [t for t in tiers if t.name in TIER_CODES]
        self.batcher = EventBatcher(config.max_events)
        self.stats = stats  # counters and gauges sent with each heartbeat (the controller's dashboard)
        self.registered = False  # the controller accepted our registration
        self.synced = False  # ... and our latest snapshot
        self.acked = 0  # number of the last batch the controller applied (or a snapshot stands for)
        self.controller = ControllerClient(config.controller_url, os.environ.get(TOKEN_ENV, ""), tls)
        self._stop = threading.Event()
        self._burst = BurstLog(log)
        for tier in self.tiers:
            tier.listeners.append(self.batcher.record)
        self._thread = threading.Thread(target=self._run, name="kvtier-cluster", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                self._step()
                if time.monotonic() >= next_beat:
                    self._answer(self._post("/heartbeat", {"id": self.reg.id, "stats": self._stats()}))
                    next_beat = time.monotonic() + self.config.heartbeat_ms / 1000
            except ControllerUnavailable as exc:
                self._burst.warning("down", "controller %s: %s", self.controller.url, exc)
                self._stop.wait(self.config.heartbeat_ms / 1000)  # back off, then try again
                continue
            self._stop.wait(self.config.flush_ms / 1000)

    def _step(self) -> None:
        """Register, resync and ship pending events, as needed."""
        if not self.registered:
            self._post("/register", asdict(self.reg))
            self.registered, self.synced = True, False
            log.info("registered with %s as %s", self.controller.url, self.reg.id)
        if not self.synced or self.batcher.overflowed:
            self._snapshot()
        batch = self.batcher.take()
        if batch is not None:
            seq, blob = batch
            try:
                answer = self._post("/events", {"id": self.reg.id, "seq": seq, "events": blob}, msgpack=True)
            except ControllerUnavailable:
                self.batcher.put_back(seq, blob)
                raise
            self._answer(answer)
            if answer.get("status") == OK:
                self.acked = seq

    def _stats(self) -> dict[str, float] | None:
        try:
            return None if self.stats is None else self.stats()
        except Exception as exc:  # stats are for display: never let them stop heartbeats
            self._burst.warning("stats", "cannot read stats for the heartbeat: %r", exc)
            return None

    def _snapshot(self) -> None:
        seq = self.batcher.reset()
        tiers = {t.name: encode_keys(t.held_keys()) for t in self.tiers}
        answer = self._post("/snapshot", {"id": self.reg.id, "seq": seq, "tiers": tiers}, msgpack=True)
        self._answer(answer)
        if answer.get("status") == OK:
            self.synced, self.acked = True, seq
            log.info("sent a snapshot of %d chunks", sum(len(b) for b in tiers.values()) // 32)

    def _answer(self, answer: dict[str, Any]) -> None:
        status = answer.get("status")
        if status == UNKNOWN:
            self.registered = self.synced = False
        elif status == RESYNC:
            self.synced = False
        elif status != OK:
            raise ControllerUnavailable(f"unexpected answer {answer!r}")

    def _post(self, path: str, payload: dict[str, Any], msgpack: bool = False) -> dict[str, Any]:
        answer = self.controller.request(path, payload, timeout=self.config.timeout_ms / 1000,
                                         limit=MAX_STATUS_ANSWER, msgpack=msgpack)  # fmt: skip
        if not isinstance(answer, dict):
            raise ControllerUnavailable(f"{path}: unexpected answer {answer!r:.200}")
        return answer

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event recorded so far reached the controller; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.synced and self.batcher.pending == 0 and self.acked == self.batcher.seq:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Stop the thread, then send pending events (best effort, one request deadline at most)."""
        self._stop.set()
        self._thread.join()
        for tier in self.tiers:
            tier.listeners.remove(self.batcher.record)
        if not (self.registered and self.synced):
            return  # nothing to add to: the next start registers and sends a snapshot anyway
        try:
            self._step()
        except ControllerUnavailable as exc:
            log.debug("final events not delivered: %s", exc)
