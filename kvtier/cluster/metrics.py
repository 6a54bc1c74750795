"""Prometheus metrics of the controller: instances, index size, events, resyncs, lookup latency."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kvtier.cluster.state import ControllerState
from kvtier.metrics import LATENCY_BUCKETS


class ControllerCollector:
    """Reads the controller's state at each scrape."""

    def __init__(self, state: ControllerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.state
        insts = list(state.instances.values())
        alive = sum(state.alive(i) for i in insts)
        by_state = GaugeMetricFamily("kvtier_controller_instances", "Registered instances", labels=["state"])
        by_state.add_metric(["alive"], alive)
        by_state.add_metric(["dead"], len(insts) - alive)
        yield by_state
        yield GaugeMetricFamily("kvtier_controller_chunks", "Distinct chunks in the index", value=len(state.index))
        yield CounterMetricFamily("kvtier_controller_events", "KV events applied", value=state.events)
        yield CounterMetricFamily("kvtier_controller_resyncs", "Snapshots applied", value=state.resyncs)
        yield CounterMetricFamily(
            "kvtier_controller_gaps", "Event batches refused for a sequence gap", value=state.gaps
        )
        held = GaugeMetricFamily("kvtier_controller_instance_chunks", "Chunks an instance holds per tier",
                                 labels=["instance", "tier"])  # fmt: skip
        for inst in insts:
            counts = state.index.counts.get(inst.slot, [0, 0])
            held.add_metric([inst.reg.id, "l1"], counts[0])
            held.add_metric([inst.reg.id, "l2"], counts[1])
        yield held


def controller_registry(state: ControllerState) -> tuple[Any, Any]:
    """A CollectorRegistry for the controller, and its lookup latency histogram."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    registry.register(ControllerCollector(state))
    latency = Histogram("kvtier_controller_lookup_seconds", "Seconds to answer a lookup (HTTP handler)",
                        registry=registry, buckets=LATENCY_BUCKETS)  # fmt: skip
    return registry, latency
