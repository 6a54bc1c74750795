"""A remote that dies, hangs or comes back: misses instead of errors, deadlines kept, hits resume."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.storage.remote.breaker import Breaker
from tests.conftest import SMALL, key, random_kv
from tests.remote.conftest import STARTERS, make_tier, server_url, store_until_a_hit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_doubles_and_closes():
    clock = FakeClock()
    breaker = Breaker(0.25, 1.0, clock)
    assert breaker.allow()
    assert breaker.failure() == 0.25 and not breaker.allow()
    clock.now = 0.25
    assert breaker.allow()  # a trial
    assert breaker.failure() == 0.5
    clock.now = 0.7
    assert not breaker.allow()
    clock.now = 0.75
    assert breaker.failure() == 1.0 and breaker.failure() == 1.0  # capped
    breaker.success()
    assert breaker.allow() and breaker.opened == 1


def test_calls_in_flight_when_the_breaker_opens_do_not_double_the_pause():
    clock = FakeClock()
    breaker = Breaker(0.25, 10.0, clock)
    assert [breaker.failure() for _ in range(5)] == [0.25] * 5  # five concurrent calls to a hung remote
    clock.now = 0.1
    assert not breaker.allow()
    clock.now = 0.25
    assert breaker.allow() and breaker.failure() == 0.5  # the trial after the pause doubles it
    assert breaker.opened == 1


@pytest.fixture
def blackhole():
    """A TCP port that accepts connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster", "redis+sentinel", "kvtier", "s3"])
def test_hung_server_costs_one_deadline_then_nothing(blackhole, scheme):
    url = f"{scheme}://127.0.0.1:{blackhole}"
    if scheme == "s3":
        url = f"s3://bucket/p?endpoint=http://127.0.0.1:{blackhole}&region=us-east-1"
    if scheme == "redis+sentinel":
        url += f",127.0.0.1:{blackhole},127.0.0.1:{blackhole}/kvtier"  # three hung sentinels, asked in turn
    tier = make_tier(url, lookup_timeout=0.1, timeout=0.3, backoff=5.0, backoff_max=5.0)
    keys = [key(i, namespace=77) for i in range(4)]
    start = time.monotonic()
    assert tier.prefix_len(keys) == 0
    first = time.monotonic() - start
    start = time.monotonic()
    assert tier.get(keys[0]) is None and not tier.put(keys[0], random_kv(SMALL, 4))
    rest = time.monotonic() - start
    tier.close()
    slack = 0.4 if scheme in ("kvtier", "s3") else 0.15  # (redis-py: socket timeouts or a worker thread)
    assert first < 0.1 + slack, f"lookup took {first:.3f} s against a 0.1 s deadline"
    assert rest < 0.05, f"calls while marked down took {rest:.3f} s"
    assert tier.stats.errors == 1 and tier.stats.unavailable == 2


@pytest.mark.parametrize("kind", ["redis", "redis+cluster", "redis+sentinel", "kvtier", "s3"])
def test_kill_9_inside_a_loop_of_stores_and_retrieves(kind):
    server = STARTERS[kind]().start()  # cluster: kills one of 3 masters; sentinel: kills the master
    remote = {"url": server_url(kind, server), "timeout_ms": 500, "lookup_timeout_ms": 200, "backoff_ms": 50,
              "backoff_max_ms": 200}  # fmt: skip
    engine = CacheEngine(Config.from_dict({"chunk_size": 4, "l1": {"size": 0}, "remote": remote}), SMALL, "kill9")
    hits = {"before": 0, "down": 0, "after": 0}
    slowest = 0.0
    try:
        # the first call connects; a cluster client also reads the slot map and the command table,
        # which on a busy machine can outlast the deadline: that call misses and the next one hits
        store_until_a_hit(engine, seconds=10.0, base=1_000_000)
        for i in range(60):
            phase = "before" if i < 20 else "down" if i < 40 else "after"
            if i == 20:
                server.kill()
            if i == 40:
                server.start()  # (for moto, which keeps nothing, this creates the bucket again)
            tokens = [i * 100 + j for j in range(8)]
            kv = random_kv(SMALL, 8, seed=i)
            start = time.monotonic()
            engine.store(tokens, kv)
            engine.flush(timeout=2.0)
            got = engine.retrieve(tokens)
            slowest = max(slowest, time.monotonic() - start)
            n = got.shape[2]
            assert n in (0, 4, 8)
            assert torch.equal(got, kv[:, :, :n]), f"wrong KV at step {i}"
            hits[phase] += n == 8
    finally:
        engine.close()
        server.stop()
    assert hits["before"] == 20, hits
    if kind != "redis+cluster":  # (the other masters still serve prompts whose chunks avoid the dead one)
        assert hits["down"] == 0, hits
    assert hits["after"] >= 10, hits  # the breaker lets a trial through within backoff_max_ms
    assert slowest < 3.0, f"one store+flush+retrieve took {slowest:.2f} s"
