"""Workers' L1 keys mirrored in the scheduler's process (cluster/holdings.py), over real sockets."""

from __future__ import annotations

import socket
import struct
import time
import uuid

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.cluster.holdings import EVENTS, HEADER, SNAPSHOT, HoldingsMirror, HoldingsPublisher, address
from kvtier.storage.cpu import CPUTier
from tests.conftest import SMALL, key, random_kv


def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def name() -> str:
    return address(uuid.uuid4().hex, 0)


def test_snapshot_then_events_then_a_publisher_restart(name):
    l1 = CPUTier(3 * 64)
    l1.put(key(0), torch.zeros(16))  # 64 bytes each
    publisher = HoldingsPublisher(l1, name)
    mirror = HoldingsMirror([name])
    try:
        assert mirror.wait_connected(5)
        assert mirror.prefix(0, [key(0), key(1)]) == 1  # from the snapshot
        l1.put(key(1), torch.zeros(16))
        l1.put(key(2), torch.zeros(16))
        until(lambda: mirror.prefix(0, [key(0), key(1), key(2)]) == 3)  # from events
        l1.put(key(3), torch.zeros(16))  # evicts key(0), the least recently used
        until(lambda: mirror.prefix(0, [key(0)]) == 0 and mirror.prefix(0, [key(3)]) == 1)
        publisher.close()
        until(lambda: not mirror.connected[0])
        assert mirror.prefix(0, [key(3)]) == 0  # a rank out of reach holds nothing
        publisher = HoldingsPublisher(l1, name)  # the same name is free again
        until(lambda: mirror.prefix(0, [key(1), key(2), key(3)]) == 3)
    finally:
        mirror.close()
        publisher.close()
    assert l1.listeners == []


def test_overflowing_events_are_replaced_by_a_snapshot(name):
    l1 = CPUTier(1 << 20)
    publisher = HoldingsPublisher(l1, name, max_events=2)
    mirror = HoldingsMirror([name])
    try:
        assert mirror.wait_connected(5)
        for i in range(50):
            l1.put(key(i), torch.zeros(4))
        until(lambda: mirror.prefix(0, [key(i) for i in range(50)]) == 50)
    finally:
        mirror.close()
        publisher.close()


@pytest.mark.parametrize(
    "frame",
    [
        HEADER.pack(7, 0),  # unknown kind
        HEADER.pack(SNAPSHOT, 31) + b"x" * 31,  # not whole keys
        HEADER.pack(EVENTS, 10) + b"x" * 10,  # torn records
        HEADER.pack(SNAPSHOT, 1 << 30),  # over the frame limit
    ],
)
def test_a_bad_frame_drops_the_connection_and_the_mirror_reconnects(name, frame):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(2)
    server.settimeout(5)
    mirror = HoldingsMirror([name], retry_s=0.01)
    try:
        conn, _ = server.accept()
        conn.sendall(HEADER.pack(SNAPSHOT, 32) + key(5).namespace + key(5).digest)
        until(lambda: mirror.prefix(0, [key(5)]) == 1)
        conn.sendall(frame)
        again, _ = server.accept()  # it hung up on the bad frame and came back
        until(lambda: mirror.prefix(0, [key(5)]) == 0)
        again.close()
        conn.close()
    finally:
        mirror.close()
        server.close()


def test_scheduler_lookup_counts_a_chunk_only_where_every_rank_has_it(tmp_path):
    from kvtier.integration.vllm.lookup import SchedulerLookup

    tokens = list(range(16))  # 4 chunks of 4
    config = Config.from_dict({"chunk_size": 4, "l1": {"size": 0}, "disk": {"path": str(tmp_path)}})
    names = [address(uuid.uuid4().hex, rank) for rank in range(2)]
    tiers = [CPUTier(1 << 20) for _ in names]
    publishers = [HoldingsPublisher(tier, name) for tier, name in zip(tiers, names, strict=True)]
    scheduler = CacheEngine(config, SMALL, "m", rank=0, world_size=2)
    lookup = SchedulerLookup(scheduler, HoldingsMirror(names))
    ranks = [CacheEngine(config, SMALL, "m", rank=r, world_size=2) for r in range(2)]
    try:
        assert lookup.mirror is not None and lookup.mirror.wait_connected(5)
        chunks = scheduler.chunks(tokens)
        kv = random_kv(SMALL, 4)
        # rank 0: chunks 0 and 2 in memory, 1 on disk; rank 1: chunks 0-1 in memory, 2 on disk
        for i in (0, 2):
            tiers[0].put(scheduler.rank_keys(chunks, 0)[i], kv)
        ranks[0].store(tokens[:8], random_kv(SMALL, 8))  # disk: chunks 0, 1 of rank 0
        for i in (0, 1):
            tiers[1].put(scheduler.rank_keys(chunks, 1)[i], kv)
        ranks[1].store(tokens[:12], random_kv(SMALL, 12))  # disk: chunks 0-2 of rank 1
        for engine in ranks:
            engine.flush()
        until(lambda: lookup(tokens) == 12)  # chunk 3 is nowhere; 0-2 each rank has somewhere
        assert lookup(tokens, salt="tenant") == 0  # another namespace
        tiers[1].delete(scheduler.rank_keys(chunks, 1)[1])  # rank 1 now lacks chunk 1 in memory ...
        until(lambda: lookup(tokens) == 12)  # ... but has it on disk
        tiers[0].delete(scheduler.rank_keys(chunks, 0)[2])  # rank 0 has chunk 2 nowhere now
        until(lambda: lookup(tokens) == 8)
        assert scheduler.counters.lookups >= 2
    finally:
        lookup.close()
        for p in publishers:
            p.close()
        for engine in [scheduler, *ranks]:
            engine.close()


def test_header_is_kind_and_little_endian_length():
    assert HEADER.pack(EVENTS, 33) == bytes([EVENTS]) + struct.pack("<I", 33)
