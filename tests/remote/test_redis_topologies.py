"""What only a Redis Cluster does: keys spread over masters, and a hung node costs one deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from tests.conftest import SMALL, key, random_kv
from tests.remote.conftest import make_tier, url_of
from tests.remote.redis_groups import ask
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


@pytest.mark.parametrize("kind", ["redis+cluster"])
def test_a_hung_node_costs_one_deadline(kind, servers, tmp_path):
    """redis-py would re-send a timed-out cluster pipeline command by command: the deadline holds."""
    tier = make_tier(url_of(kind, servers, tmp_path), lookup_timeout=0.1, timeout=0.3, backoff=5.0, backoff_max=5.0)
    keys = [key(i, namespace=80) for i in range(32)]  # some on every master
    for k in keys:
        assert tier.put(k, random_kv(SMALL, 1))
    assert tier.prefix_len(keys) == 32
    with paused(servers[kind].victim()):
        start = time.monotonic()
        assert tier.prefix_len(keys) == 0
        first = time.monotonic() - start
        start = time.monotonic()
        assert tier.get_many(keys[:4]) == [None] * 4
        rest = time.monotonic() - start
    tier.close()
    assert first < 0.1 + 0.1, f"lookup took {first:.3f} s against a 0.1 s deadline"
    assert rest < 0.05, f"calls while marked down took {rest:.3f} s"
    assert tier.stats.errors == 1 and tier.stats.unavailable == 1
