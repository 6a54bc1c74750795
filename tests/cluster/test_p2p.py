"""P2P with real processes: chunks fetched from a peer bit-exactly; a dead or hung peer costs a deadline."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.cluster.procs import Controller, Instance, wait_for

pytest.importorskip("fastapi")

DOC = list(range(2000, 2040))  # 10 chunks of 4
OTHER = list(range(7000, 7012))  # 3 chunks
SERVE = {"KVTIER_CLUSTER_ADVERTISE": "127.0.0.1:0"}
# generous deadlines where the test is about the data (this machine is shared), short ones for a hung peer
FETCH = {"KVTIER_CLUSTER_PEER_FETCH": "true", "KVTIER_CLUSTER_PEER_TIMEOUT_MS": "10000",
         "KVTIER_CLUSTER_PEER_LOOKUP_TIMEOUT_MS": "10000"}  # fmt: skip
IMPATIENT = FETCH | {"KVTIER_CLUSTER_PEER_TIMEOUT_MS": "500", "KVTIER_CLUSTER_PEER_LOOKUP_TIMEOUT_MS": "1000"}
MOVER = {"KVTIER_CLUSTER_PEER_TIMEOUT_MS": "10000"}


@pytest.fixture
def cluster(tmp_path):
    controller = Controller(missed_beats=10)
    started: list[Instance] = []

    def start(instance_id: str, extra: dict[str, str], disk: bool = False, admin: bool = False) -> Instance:
        l1 = extra.get("KVTIER_L1_SIZE", "1MiB")
        inst = Instance(instance_id, controller, l1, tmp_path / instance_id if disk else None, admin, extra)
        started.append(inst)
        return inst

    yield controller, start
    for inst in started:
        if inst.proc.poll() is None:
            os.kill(inst.proc.pid, signal.SIGCONT)
        inst.stop()
    controller.stop()


def test_fetch_from_a_peer_is_bit_exact_and_lands_in_l1(cluster):
    controller, start = cluster
    a = start("a", SERVE, disk=True)
    b = start("b", FETCH)
    a.call("store", tokens=DOC[:28])
    assert controller.instances()["a"]["address"].startswith("127.0.0.1:")
    got = b.call("retrieve", tokens=DOC)
    assert got["tokens"] == 28
    assert got["digest"] == b.call("expected", tokens=DOC[:28])["digest"]  # the same bits a stored
    b.call("sync")
    assert controller.instances()["b"]["chunks"]["l1"] == 7  # promoted into b's L1 and reported
    answer = controller.post("/lookup", {"tokens": DOC, "model": "test-model"})
    assert {e["id"] for e in answer["instances"]} == {"a", "b"}


def test_a_hung_peer_costs_one_deadline_then_nothing(cluster):
    controller, start = cluster
    a = start("a", SERVE)
    b = start("b", IMPATIENT)
    a.call("store", tokens=DOC[:20])
    os.kill(a.proc.pid, signal.SIGSTOP)  # accepts connections (kernel backlog) but never answers
    began = time.monotonic()
    got = b.call("retrieve", tokens=DOC, repeat=2)
    assert got["tokens"] == 0 and time.monotonic() - began < 10
    first, again = got["seconds"]
    assert 0.5 <= first < 0.5 + 1.0 + 0.5  # the fetch deadline; at most + the lookup deadline + slack
    assert again < 0.2  # the breaker is open (250 ms): no second wait
    wait_for(lambda: not controller.instances()["a"]["alive"], 15, "a marked dead")
    os.kill(a.proc.pid, signal.SIGCONT)


def test_a_hung_peer_is_skipped_and_the_next_best_peer_serves(cluster):
    _, start = cluster
    a, c = start("a", SERVE), start("c", SERVE)
    b = start("b", IMPATIENT | {"KVTIER_CLUSTER_PEER_TIMEOUT_MS": "1000"})
    a.call("store", tokens=DOC[:28])  # the longest prefix: the controller's first choice
    c.call("store", tokens=DOC[:20])
    os.kill(a.proc.pid, signal.SIGSTOP)
    got = b.call("retrieve", tokens=DOC, repeat=2)
    first, again = got["seconds"]
    assert first >= 1.0  # the first try waited for a, then missed
    assert got["tokens"] == 20 and again < 1.0  # the second went straight to c: only a is paused
    assert got["digest"] == b.call("expected", tokens=DOC[:20])["digest"]
    os.kill(a.proc.pid, signal.SIGCONT)


def test_move_copies_chunks_between_instances(cluster):
    controller, start = cluster
    a = start("a", SERVE)
    b = start("b", MOVER, admin=True)
    a.call("store", tokens=DOC[:28])
    answer = controller.post("/move", {"source": "a", "dest": "b", "tokens": DOC, "model": "test-model"})
    assert answer == {"from": "a", "to": "b", "stored": 7}
    b.call("sync")
    got = b.call("retrieve", tokens=DOC)
    assert got["tokens"] == 28 and got["digest"] == b.call("expected", tokens=DOC[:28])["digest"]
    assert controller.instances()["b"]["chunks"]["l1"] == 7


def test_pin_keeps_chunks_in_l1(cluster):
    controller, start = cluster
    a = start("a", {"KVTIER_L1_SIZE": str(3 * 4 * 256)}, admin=True)  # room for 3 chunks
    a.call("store", tokens=DOC[:12])
    pinned = controller.post("/pin", {"tokens": DOC[:12], "model": "test-model"})
    assert pinned == {"pinned": {"a": 3}}
    a.call("store", tokens=OTHER)  # L1 is full of pinned chunks: refused
    assert len(a.call("keys")["l1"]) == 3
    assert controller.post("/lookup", {"tokens": DOC, "model": "test-model"})["best_tokens"] == 12
    assert controller.post("/unpin", {"tokens": DOC[:12], "model": "test-model"}) == {"unpinned": {"a": 3}}
    a.call("store", tokens=OTHER)
    assert controller.post("/lookup", {"tokens": DOC, "model": "test-model"})["best_tokens"] == 0
