"""A cluster over TLS: the controller on HTTPS, instances' admin APIs on HTTPS, P2P over TLS; a client
trusting another CA is refused (the agent keeps retrying, a peer lookup is a miss)."""

from __future__ import annotations

import logging
import time

import pytest

from kvtier import Config, Node
from kvtier.cluster.agent import ClusterAgent
from kvtier.cluster.app import TOKEN_ENV
from kvtier.cluster.client import ControllerClient
from kvtier.cluster.peer import PeerStore
from kvtier.cluster.state import Registration
from kvtier.codec import get_codec
from kvtier.config import ClusterConfig
from kvtier.storage.remote.tier import RemoteOptions, RemoteTier
from kvtier.tls import ClientTLS
from tests.cluster.procs import Controller, free_port, wait_for
from tests.conftest import SMALL, key, random_kv

pytest.importorskip("fastapi")

TOKEN = "s3cret"
DOC = list(range(4000, 4020))  # 5 chunks of 4


@pytest.fixture(scope="module")
def controller(certs):
    controller = Controller(missed_beats=10, certs=certs, token=TOKEN)
    yield controller
    controller.stop()


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


def registration(instance_id: str) -> Registration:
    return Registration(id=instance_id, model="other", namespace="00" * 16, chunk_size=4, hash="xxh128",
                        save_partial=True, heartbeat_s=0.1)  # fmt: skip


def agent(controller: Controller, instance_id: str, ca: str) -> ClusterAgent:
    cluster = ClusterConfig(controller_url=controller.url, instance_id=instance_id, heartbeat_ms=100)
    return ClusterAgent(cluster, registration(instance_id), [], tls=ClientTLS(ca))


def test_an_agent_registers_over_https(controller, certs):
    a = agent(controller, "tls-a", certs.ca)
    try:
        wait_for(lambda: a.registered and a.synced, 15, "registration")
        assert controller.instances()["tls-a"]["alive"]
    finally:
        a.close()


def test_a_client_trusting_another_ca_is_refused(controller, certs, caplog):
    with caplog.at_level(logging.WARNING, logger="kvtier.cluster.agent"):
        a = agent(controller, "tls-b", certs.other_ca)
        try:
            time.sleep(0.5)  # five heartbeat intervals: as many tries, each refused, one log line
            assert not a.registered and a._thread.is_alive()
        finally:
            a.close()
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert "tls-b" not in controller.instances()

    store = PeerStore(ControllerClient(controller.url, TOKEN, ClientTLS(certs.other_ca)), "tls-b")
    tier = RemoteTier(store, SMALL, get_codec("raw"), RemoteOptions(), name="peer")
    assert tier.prefix_len([key(1), key(2)]) == 0  # a miss, counted as an error
    assert tier.stats.errors == 1


def node(controller: Controller, certs, instance_id: str, **cluster: object) -> Node:
    settings = {"chunk_size": 4, "hash": "xxh128",
                "cluster": {"controller_url": controller.url, "instance_id": instance_id, "advertise": "127.0.0.1:0",
                            "heartbeat_ms": 100, "flush_ms": 20, "peer_timeout_ms": 10_000,
                            "peer_lookup_timeout_ms": 10_000} | cluster,
                "admin": {"port": free_port()},
                "tls": {"cert": certs.cert, "key": certs.key, "ca": certs.ca}}  # fmt: skip
    started = Node(Config.from_dict(settings), SMALL, "m")
    wait_for(lambda: started.agent.synced, 30, f"{instance_id} registered")
    return started


def test_a_cluster_over_tls(controller, certs):
    a = node(controller, certs, "a")
    b = node(controller, certs, "b", peer_fetch=True)
    try:
        assert controller.instances()["a"]["admin_url"] == a.admin.url and a.admin.url.startswith("https://")
        assert a.peer_server.url.startswith("kvtiers://")
        kv = random_kv(SMALL, len(DOC))
        a.engine.store(DOC[:12], kv[:, :, :12])
        assert a.agent.flush(10)
        assert b.engine.lookup(DOC) == 12  # the peer tier: lookup over HTTPS, fetch over TLS
        moved = controller.post("/move", {"source": "a", "dest": "b", "tokens": DOC, "model": "m"})
        assert moved == {"from": "a", "to": "b", "stored": 3}  # the controller to b's admin API over HTTPS
        cleared = controller.post("/clear", {"instance": "a"})
        assert cleared == {"cleared": {"a": 3}}
    finally:
        b.close()
        a.close()
