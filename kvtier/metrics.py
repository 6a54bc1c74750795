"""Prometheus metrics of a CacheEngine (prometheus-client, imported only when metrics are used).

Counters and gauges are read from the engine's own counters at scrape time, so they cost the
serving path nothing; only the latency histograms are observed per call (through
`CacheEngine.observer`). Every metric is described in docs/cluster.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.engine import CacheEngine

# TierStats field -> (metric name, help); counters get "_total" from prometheus-client
TIER_COUNTERS = {
    "hits": ("kvtier_tier_hits", "Reads of a tier that found the chunk"),
    "misses": ("kvtier_tier_misses", "Reads of a tier that found nothing (absent, corrupt or failed)"),
    "puts": ("kvtier_tier_puts", "Chunks written to a tier"),
    "bytes_read": ("kvtier_tier_read_bytes", "Bytes of KV read from a tier"),
    "bytes_written": ("kvtier_tier_written_bytes", "Bytes of KV written to a tier"),
    "evictions": ("kvtier_tier_evictions", "Chunks evicted from a tier to make room"),
    "errors": ("kvtier_tier_errors", "I/O or backend errors of a tier (each became a miss or a failed write)"),
    "corrupt": ("kvtier_tier_corrupt", "Objects that failed validation and were deleted"),
    "put_failures": ("kvtier_tier_put_failures", "Writes a tier refused or failed"),
}
TIER_GAUGES = {
    "objects": ("kvtier_tier_objects", "Chunks held by a tier"),
    "bytes": ("kvtier_tier_bytes", "Bytes held by a tier"),
}
ENGINE_COUNTERS = {
    "lookups": ("kvtier_lookups", "Lookups (engine.lookup calls)"),
    "lookup_tokens": ("kvtier_lookup_tokens", "Tokens looked up"),
    "lookup_hit_tokens": ("kvtier_lookup_hit_tokens", "Looked-up tokens found cached"),
    "retrieved_tokens": ("kvtier_retrieved_tokens", "Tokens of KV delivered by retrieves"),
    "stored_tokens": ("kvtier_stored_tokens", "Tokens of KV newly stored"),
}
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineCollector:
    """Reads an engine's counters at each scrape."""

    def __init__(self, engine: CacheEngine, agent: Callable[[], Any] | None = None) -> None:
        self.engine = engine
        self.agent = agent or (lambda: None)  # the engine's cluster agent, if it joined a cluster

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        counters = stats.pop("engine")
        for field, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=counters[field])
        looked = counters["lookup_tokens"]
        yield GaugeMetricFamily("kvtier_hit_rate", "Hit tokens / looked-up tokens since start (0 before any lookup)",
                                value=counters["lookup_hit_tokens"] / looked if looked else 0.0)  # fmt: skip
        tiers = {name: s for name, s in stats.items() if not name.endswith("_writes")}
        for field, (name, doc) in TIER_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["tier"])
            for tier, s in tiers.items():
                family.add_metric([tier], s[field])
            yield family
        for field, (name, doc) in TIER_GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=["tier"])
            for tier, s in tiers.items():
                gauge.add_metric([tier], s[field])
            yield gauge
        yield from self._writers(stats)

    def _writers(self, stats: dict[str, Any]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        depth = GaugeMetricFamily(
            "kvtier_write_queue_depth", "Writes queued or running for a lower tier", labels=["tier"]
        )
        dropped = CounterMetricFamily("kvtier_writes_dropped", "Writes dropped from a full queue", labels=["tier"])
        for name, s in stats.items():
            if name.endswith("_writes"):
                depth.add_metric([name[: -len("_writes")]], s["pending"])
                dropped.add_metric([name[: -len("_writes")]], s["dropped"])
        yield depth
        yield dropped
        agent = self.agent()
        if agent is not None:
            yield GaugeMetricFamily("kvtier_cluster_events_pending", "KV events not yet sent to the controller",
                                    value=agent.batcher.pending)  # fmt: skip


def engine_registry(engine: CacheEngine, agent: Callable[[], Any] | None = None) -> Any:
    """A CollectorRegistry with the engine's metrics (and its cluster agent's, which `agent` returns
    once it runs); it starts timing the engine's calls."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, agent))
    latency = Histogram("kvtier_operation_seconds", "Seconds per engine call", ["op"], registry=registry,
                        buckets=LATENCY_BUCKETS)  # fmt: skip
    children = {op: latency.labels(op) for op in ("lookup", "retrieve", "store")}
    engine.observer = lambda op, seconds: children[op].observe(seconds)
    return registry
