"""What only a Redis Cluster or a Sentinel-watched master does: keys spread over masters, a hung node
costs one deadline, and a failover moves the tier to the promoted replica."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import torch

from kvtier import CacheEngine, Config
from tests.conftest import SMALL, key, random_kv
from tests.remote.conftest import make_tier, store_until_a_hit, url_of
from tests.remote.redis_groups import RedisSentinelGroup, ask
from tests.remote.servers import ServerProcess


@contextlib.contextmanager
def paused(server: ServerProcess):
    """SIGSTOP `server` (a hung server: connections open, nothing answers) until the block ends."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_cluster_keys_spread_over_every_master(servers, tmp_path):
    tier = make_tier(url_of("redis+cluster", servers, tmp_path), lookup_timeout=2.0, timeout=5.0)
    keys = [key(i, namespace=79) for i in range(32)]
    before = [ask(node.port, lambda c: c.dbsize()) for node in servers["redis+cluster"].nodes]
    for k in keys:
        assert tier.put(k, random_kv(SMALL, 1))
    after = [ask(node.port, lambda c: c.dbsize()) for node in servers["redis+cluster"].nodes]
    assert tier.prefix_len(keys) == 32 and all(g is not None for g in tier.get_many(keys))
    tier.close()
    gained = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(gained) == 32 and min(gained) > 0, gained  # no hash tag: no node holds a prompt alone


@pytest.mark.parametrize("kind", ["redis+cluster", "redis+sentinel"])
def test_a_hung_node_costs_one_deadline(kind, servers, tmp_path):
    """redis-py would re-send a timed-out cluster pipeline command by command: the deadline holds."""
    tier = make_tier(url_of(kind, servers, tmp_path), lookup_timeout=0.1, timeout=0.3, backoff=5.0, backoff_max=5.0)
    keys = [key(i, namespace=80) for i in range(32)]  # some on every master
    for k in keys:
        assert tier.put(k, random_kv(SMALL, 1))
    # the first lookup also warms the lookup path; on a busy 2-core machine it can miss its 0.1 s
    # deadline (a flake, not the behaviour under test): then the tier retries after its backoff
    if tier.prefix_len(keys) != 32:
        time.sleep(5.2)
        assert tier.prefix_len(keys) == 32
    errors, unavailable = tier.stats.errors, tier.stats.unavailable
    with paused(servers[kind].victim()):  # (shorter than the sentinel's 1 s down-after: no failover)
        start = time.monotonic()
        assert tier.prefix_len(keys) == 0
        first = time.monotonic() - start
        start = time.monotonic()
        assert tier.get_many(keys[:4]) == [None] * 4
        rest = time.monotonic() - start
    tier.close()
    assert first < 0.1 + 0.1, f"lookup took {first:.3f} s against a 0.1 s deadline"
    assert rest < 0.05, f"calls while marked down took {rest:.3f} s"
    assert tier.stats.errors - errors == 1 and tier.stats.unavailable - unavailable == 1


def test_sentinel_failover_moves_the_tier_to_the_promoted_replica():
    group = RedisSentinelGroup().start()
    # deadlines long enough that a busy machine cannot fake a miss: this test is about the failover
    remote = {"url": group.url, "timeout_ms": 2000, "lookup_timeout_ms": 1000, "backoff_ms": 50, "backoff_max_ms": 200}
    engine = CacheEngine(Config.from_dict({"chunk_size": 4, "l1": {"size": 0}, "remote": remote}), SMALL, "failover")
    old = [900_000 + j for j in range(8)]  # (store_until_a_hit stores prompts from token 0 up)
    try:
        engine.store(old, random_kv(SMALL, 8, seed=99))
        assert engine.flush(timeout=2.0)
        first_master = group.master_port()
        assert ask(first_master, lambda c: c.wait(1, 2000)) == 1  # the replica has the objects
        group.kill()
        hit_after = store_until_a_hit(engine, seconds=20.0)
        assert group.master_port() != first_master  # the replica was promoted, not the old master back
        assert torch.equal(engine.retrieve(old), random_kv(SMALL, 8, seed=99))  # replicated before the kill
    finally:
        engine.close()
        group.stop()
    assert hit_after < 15.0, f"hits resumed only after {hit_after:.1f} s"
