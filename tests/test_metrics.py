"""Prometheus metrics of an engine: names, labels and values after real calls."""

from __future__ import annotations

import pytest

from kvtier import CacheEngine, Config
from tests.conftest import SMALL, random_kv

prometheus_client = pytest.importorskip("prometheus_client")


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_engine_metrics(tmp_path):
    config = Config.from_dict({"chunk_size": 4, "l1": {"size": 4096}, "disk": {"path": str(tmp_path)}})
    with CacheEngine(config, SMALL) as engine:
        from kvtier.metrics import engine_registry

        registry = engine_registry(engine)
        tokens = list(range(20))
        engine.store(tokens, random_kv(SMALL, 20))
        engine.flush()
        assert engine.lookup(tokens + [99] * 4) == 20
        engine.retrieve(tokens)
        text = prometheus_client.generate_latest(registry).decode()
    assert sample(text, "kvtier_lookups_total") == 1
    assert sample(text, "kvtier_hit_rate") == pytest.approx(20 / 24)
    assert sample(text, 'kvtier_tier_written_bytes_total{tier="l2"}') == 20 * SMALL.bytes_per_token
    assert sample(text, 'kvtier_tier_evictions_total{tier="l1"}') == 1  # 5 chunks of 1 KiB in 4 KiB
    assert sample(text, 'kvtier_tier_objects{tier="l2"}') == 5
    assert sample(text, 'kvtier_write_queue_depth{tier="l2"}') == 0
    assert sample(text, 'kvtier_operation_seconds_count{op="retrieve"}') == 1
    assert sample(text, 'kvtier_operation_seconds_count{op="store"}') == 1


def test_clear_removes_what_the_instance_holds(tmp_path):
    config = Config.from_dict({"chunk_size": 4, "disk": {"path": str(tmp_path)}})
    with CacheEngine(config, SMALL) as engine:
        engine.store(list(range(8)), random_kv(SMALL, 8))
        assert engine.clear() == 4  # 2 chunks in L1 and 2 on disk
        assert engine.lookup(list(range(8))) == 0
