"""The composition root: a Node starts the services its config asks for, per rank, and stops them all."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request

import pytest

from kvtier import CacheEngine, Config, Node
from kvtier.errors import ConfigError
from kvtier.node import rank_instance_id, rank_port
from tests.cluster.procs import free_port
from tests.conftest import SMALL, random_kv

pytest.importorskip("uvicorn")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def port_is_free(port: int) -> bool:
    """Whether a server could listen on `port` now (as uvicorn does: SO_REUSEADDR, so the closed
    connections' TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def two_free_ports() -> int:
    for _ in range(50):
        base = free_port()
        if port_is_free(base + 1):
            return base
    raise RuntimeError("no two consecutive free ports")


def test_a_bare_engine_warns_and_starts_no_service(caplog):
    port = free_port()
    config = Config.from_dict({"chunk_size": 4, "admin": {"port": port}})
    with caplog.at_level(logging.WARNING, logger="kvtier.engine"), CacheEngine(config, SMALL) as engine:
        assert port_is_free(port)
        assert not hasattr(engine, "admin")
    assert "CacheEngine ignores the admin and cluster settings" in caplog.text


def test_each_rank_serves_its_own_engine_on_its_own_port_and_close_frees_them():
    base = two_free_ports()
    config = Config.from_dict({"chunk_size": 4, "admin": {"port": base}})
    nodes = [Node(config, SMALL, "m", rank=rank, world_size=2) for rank in range(2)]
    try:
        nodes[1].engine.store(list(range(8)), random_kv(SMALL, 8))
        answers = [get(f"http://127.0.0.1:{base + rank}/health") for rank in range(2)]
        assert [a["rank"] for a in answers] == [0, 1]
        configs = [get(f"http://127.0.0.1:{base + rank}/config") for rank in range(2)]
        assert [c["namespace"] for c in configs] == [n.engine.hasher.namespace.hex() for n in nodes]
        assert configs[0]["admin"]["port"] == base  # /config shows the node's whole config
        assert get(f"http://127.0.0.1:{base + 1}/stats")["engine"]["stored_tokens"] == 8
        assert "admin API http://127.0.0.1:" in nodes[1].describe()
    finally:
        for node in nodes:
            node.close()
    assert port_is_free(base) and port_is_free(base + 1)


def test_services_start_once_and_only_when_asked():
    port = free_port()
    node = Node(Config.from_dict({"chunk_size": 4, "admin": {"port": port}}), SMALL, services=False)
    try:
        assert node.admin is None and port_is_free(port)
        node.start_services()
        admin = node.admin
        node.start_services()  # idempotent: a second caller (a worker after the scheduler) changes nothing
        assert node.admin is admin and get(f"http://127.0.0.1:{port}/health")["status"] == "ok"
    finally:
        node.close()
    node.close()  # twice is harmless
    assert port_is_free(port)


def test_a_service_that_cannot_start_stops_the_node_and_keeps_stored_kv(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    disk = {"path": str(tmp_path)}
    tokens = list(range(8))
    with Node(Config.from_dict({"chunk_size": 4, "disk": disk}), SMALL) as first:
        first.engine.store(tokens, random_kv(SMALL, 8))
    try:
        with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}"):
            Node(Config.from_dict({"chunk_size": 4, "disk": disk, "admin": {"port": port}}), SMALL)
    finally:
        busy.close()
    with Node(Config.from_dict({"chunk_size": 4, "disk": disk}), SMALL) as again:
        assert again.engine.lookup(tokens) == 8  # nothing stored was lost


def test_rank_ports_and_instance_ids():
    assert [rank_port(9100, r) for r in range(3)] == [9100, 9101, 9102]
    assert rank_port(0, 3) == 0  # any free port stays any free port
    assert rank_instance_id("a", 0, 1) == "a"
    assert [rank_instance_id("a", r, 2) for r in range(2)] == ["a-rank0", "a-rank1"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVTIER_CHUNK_SIZE": "abc"}, "kvtier config: chunk_size (from KVTIER_* variables): expected an integer"),
        (
            {"KVTIER_L1_POLICY": "lruu"},
            "kvtier config: l1.policy: 'lruu' is not one of lru, lfu, fifo, mru (did you mean 'lru'?)",
        ),
        (
            {"LMCACHE_REMOTE_URL": "lm://localhost:65432"},
            "kvtier config: remote.url: 'lm://localhost:65432': LMCache's lm:// server protocol is not supported",
        ),
    ],
)
def test_a_bad_configuration_is_one_line_and_exit_status_2(env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVTIER_", "LMCACHE_"))}
    done = subprocess.run([sys.executable, "-m", "kvtier", "config"], env=clean | env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_python_dash_m_kvtier_is_the_kvtier_command():
    done = subprocess.run([sys.executable, "-m", "kvtier", "--version"], capture_output=True, text=True, timeout=60,
                          check=True)  # fmt: skip
    assert done.stdout.startswith("kvtier ")


def test_a_p2p_port_beyond_loopback_needs_a_token(monkeypatch):
    monkeypatch.delenv("KVTIER_SERVER_TOKEN", raising=False)
    cluster = {"advertise": f"0.0.0.0:{free_port()}", "controller_url": f"http://127.0.0.1:{free_port()}",
               "instance_id": "a"}  # fmt: skip  # peers serve in a cluster (nobody answers there: no matter)
    config = Config.from_dict({"chunk_size": 4, "cluster": cluster})
    with pytest.raises(ConfigError, match=r"P2P port: binding '0.0.0.0'.*\$KVTIER_SERVER_TOKEN"):
        Node(config, SMALL, "m")
    monkeypatch.setenv("KVTIER_SERVER_TOKEN", "s3cret")
    with Node(config, SMALL, "m") as node:
        assert node.peer_server is not None and node.peer_server.address[0] == "0.0.0.0"
