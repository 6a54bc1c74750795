"""The admin API's /fetch (a move's destination side): addresses checked, only registered peers reached."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from kvtier import Config, Node
from kvtier.cluster.address import split_address
from tests.cluster.procs import Controller, free_port, wait_for
from tests.conftest import SMALL, random_kv

pytest.importorskip("fastapi")

DOC = list(range(3000, 3016))  # 4 chunks of 4


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:7600", ("127.0.0.1", 7600)), ("Peer-1.example:1", ("peer-1.example", 1)),
     ("[::1]:65535", ("::1", 65535)), ("[0:0::1]:80", ("::1", 80))],
)  # fmt: skip
def test_good_addresses(address, expected):
    assert split_address(address) == expected


BAD = [("a:b:c", "in brackets"), ("host", "not host:port"), (":80", "not host:port"), ("h:0", "1-65535"),
       ("h:65536", "1-65535"), ("h:8o", "1-65535"), ("h:+80", "1-65535"), ("h:٣", "1-65535"),
       ("[zz]:80", "not an IPv6"), ("[::1:80", "in brackets"), ("a b:80", "not a host name"),
       ("user@h:80", "not a host name"), ("h:" + "9" * 5000, "1-65535"), (5, "got int"),
       (None, "got NoneType")]  # fmt: skip


@pytest.mark.parametrize(("address", "reason"), BAD)
def test_bad_addresses(address, reason):
    with pytest.raises(ValueError, match=reason):
        split_address(address)


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def node(controller: Controller, instance_id: str, admin: bool = False) -> Node:
    cluster = {"controller_url": controller.url, "instance_id": instance_id, "advertise": "127.0.0.1:0",
               "heartbeat_ms": 200, "flush_ms": 20}  # fmt: skip
    config = {"chunk_size": 4, "hash": "xxh128", "cluster": cluster, "admin": {"port": free_port() if admin else 0}}
    started = Node(Config.from_dict(config), SMALL, "m")
    wait_for(lambda: started.agent.synced, 30, f"{instance_id} registered")
    return started


@pytest.fixture
def cluster():
    controller = Controller(missed_beats=10)
    nodes: list[Node] = []

    def start(instance_id: str, admin: bool = False) -> Node:
        nodes.append(node(controller, instance_id, admin))
        return nodes[-1]

    yield controller, start
    for n in nodes:
        n.close()
    controller.stop()


def test_fetch_reaches_only_live_registered_peers(cluster):
    from kvtier.server.config import ServerConfig
    from kvtier.server.server import ServerThread

    controller, start = cluster
    a, b = start("a"), start("b", admin=True)
    a.engine.store(DOC, random_kv(SMALL, len(DOC)))
    keys = [c.key for c in a.engine.chunks(DOC)]
    body = {"namespace": keys[0].namespace.hex(), "hashes": [k.digest.hex() for k in keys]}
    fetch = b.admin.url + "/fetch"
    with ServerThread(ServerConfig(port=0, memory=1 << 20)) as stranger:  # a kvtier server nobody registered
        status, answer = post(fetch, body | {"address": f"127.0.0.1:{stranger.address[1]}"})
    assert status == 403 and "not the address of any instance registered" in answer["detail"]
    status, answer = post(fetch, body | {"address": controller.instances()["b"]["address"]})
    assert status == 403 and "own address" in answer["detail"]
    for address, reason in BAD:
        status, answer = post(fetch, body | {"address": address})
        assert status == 400 and reason in answer["detail"], (address, answer)
    assert post(fetch, body | {"address": controller.instances()["a"]["address"]}) == (200, {"stored": 4})
    assert b.engine.lookup(DOC) == 16

    a.close()  # deregisters nothing: a is dead once its heartbeats stop
    wait_for(lambda: not controller.instances()["a"]["alive"], 15, "a marked dead")
    status, answer = post(fetch, body | {"address": controller.instances()["a"]["address"]})
    assert status == 403 and "not alive" in answer["detail"]
    controller.stop()
    status, answer = post(fetch, body | {"address": "127.0.0.1:1"})
    assert status == 503 and "cannot ask the controller" in answer["detail"]
