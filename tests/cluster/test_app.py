"""The controller's HTTP API, in process (FastAPI's TestClient)."""

from __future__ import annotations

import logging

import msgspec
import pytest

from kvtier.cluster.app import MSGPACK, ControllerConfig, create_app
from kvtier.cluster.events import encode_record
from kvtier.errors import ConfigError
from kvtier.keys import ChunkHasher

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

NS = bytes(range(16))
TOKENS = list(range(20))  # 5 chunks of 4


def registration(instance_id: str) -> dict:
    return {"id": instance_id, "model": "m", "namespace": NS.hex(), "chunk_size": 4, "hash": "xxh128",
            "save_partial": True, "heartbeat_s": 1.0}  # fmt: skip


def keys() -> list[bytes]:
    return [c.key.namespace + c.key.digest for c in ChunkHasher(4, NS, "xxh128").chunks(TOKENS)]


def post_msgpack(client: TestClient, path: str, payload: dict) -> dict:
    r = client.post(path, content=msgspec.msgpack.encode(payload), headers={"Content-Type": MSGPACK})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(ControllerConfig(max_body=1 << 20)))


def test_register_sync_events_and_lookup(client):
    assert client.post("/register", json=registration("a")).json()["status"] == "resync"
    assert client.post("/register", json=registration("bb")).json()["slot"] == 1
    assert post_msgpack(client, "/snapshot", {"id": "a", "seq": 0, "tiers": {"l1": b"".join(keys()[:2])}}) == {
        "status": "ok"
    }
    assert post_msgpack(client, "/snapshot", {"id": "bb", "seq": 5, "tiers": {"l2": b""}})["status"] == "ok"
    events = b"".join(encode_record(1, True, k) for k in keys()[:4])
    assert post_msgpack(client, "/events", {"id": "bb", "seq": 6, "events": events})["status"] == "ok"
    answer = client.post("/lookup", json={"tokens": TOKENS, "model": "m"}).json()
    assert answer["best"] == "bb" and answer["best_tokens"] == 16
    assert [(e["id"], e["chunks"], e["tokens"]) for e in answer["instances"]] == [("bb", 4, 16), ("a", 2, 8)]
    by_hash = client.post("/lookup", json={"namespace": NS.hex(), "hashes": [k[16:].hex() for k in keys()]}).json()
    assert by_hash["best"] == "bb" and by_hash["best_tokens"] is None
    assert post_msgpack(client, "/events", {"id": "bb", "seq": 9, "events": events})["status"] == "resync"
    assert client.post("/lookup", json={"tokens": TOKENS, "model": "m"}).json()["best"] == "a"  # bb owes a snapshot
    listed = {i["id"]: i for i in client.get("/instances").json()}
    assert listed["a"]["chunks"] == {"l1": 2, "l2": 0} and listed["a"]["alive"]
    assert listed["bb"]["synced"] is False  # the gap above
    assert client.get("/health").json()["chunks"] == 4
    assert client.delete("/instances/a").status_code == 200
    assert client.delete("/instances/a").status_code == 404


def test_bad_requests_are_400_or_404(client):
    assert client.post("/register", json={"id": "x"}).status_code == 400
    assert client.post("/lookup", json={"tokens": [1], "hashes": []}).status_code == 400
    assert client.post("/lookup", json={"tokens": [1, 2], "model": "none"}).status_code == 404
    assert client.post("/lookup", content=b"{not json").status_code == 400
    assert client.post("/events", content=b"\xc1", headers={"Content-Type": MSGPACK}).status_code == 400
    assert client.post("/heartbeat", json={"id": "nobody"}).json()["status"] == "unknown"


def test_body_limit(client):
    assert client.post("/lookup", content=b"x" * ((1 << 20) + 1)).status_code == 413


def test_token_is_required_except_for_health():
    client = TestClient(create_app(ControllerConfig(token="s3cret")))
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200  # the dashboard page: it holds no data
    assert client.get("/instances").status_code == 401
    assert client.get("/instances", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/instances", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", p) for p in ("/clear", "/pin", "/unpin", "/move", "/register", "/heartbeat", "/events",
                           "/snapshot", "/lookup", "/holders")]
    + [("delete", "/instances/a"), ("get", "/history"), ("get", "/metrics"), ("get", "/nowhere")],
)  # fmt: skip
def test_every_other_route_needs_the_token(method, path):
    client = TestClient(create_app(ControllerConfig(token="s3cret")))
    client.post("/register", json=registration("a"), headers={"Authorization": "Bearer s3cret"})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        kwargs = {"json": {"instance": "a"}, "headers": headers} if method == "post" else {"headers": headers}
        answer = getattr(client, method)(path, **kwargs)
        assert answer.status_code == 401 and answer.json()["detail"] == "missing or wrong bearer token"
    assert client.get("/instances", headers={"Authorization": "Bearer s3cret"}).json()[0]["id"] == "a"  # untouched


def test_no_token_is_refused_beyond_loopback_and_warned_about_on_it(caplog):
    with pytest.raises(ConfigError, match=r"binding '0.0.0.0'.*needs a token; set --token-file or \$KVTIER_CONTROLLER"):
        create_app(ControllerConfig(host="0.0.0.0"))
    create_app(ControllerConfig(host="0.0.0.0", token="s3cret"))
    with caplog.at_level(logging.WARNING, logger="kvtier.auth"):
        create_app(ControllerConfig(host="127.0.0.1"))
    assert "kvtier controller on 127.0.0.1 has no token" in caplog.text


def test_malformed_input_is_a_4xx_with_a_reason(client):
    def refused(answer, status: int, reason: str) -> None:
        assert answer.status_code == status and reason in answer.json()["detail"], answer.text

    client.post("/register", json=registration("a"))
    post_msgpack(client, "/snapshot", {"id": "a", "seq": 0, "tiers": {"l1": b"".join(keys()[:2])}})
    events = encode_record(1, True, keys()[3]) + bytes([9 << 1]) + keys()[4]  # a good record, then tier 9
    answer = client.post("/events", content=msgspec.msgpack.encode({"id": "a", "seq": 1, "events": events}),
                         headers={"Content-Type": MSGPACK})  # fmt: skip
    refused(answer, 400, "tier code")
    assert client.get("/instances").json()[0]["chunks"] == {"l1": 2, "l2": 0}  # nothing of the batch applied
    refused(client.post("/register", json=registration("b") | {"namespace": "00"}), 400, "namespace")
    refused(client.post("/register", json=registration("b") | {"heartbeat_s": 0}), 400, "heartbeat_s")
    refused(client.post("/register", json=registration("b") | {"address": "a:b:c"}), 400, "address")
    refused(client.post("/register", json=registration("b") | {"admin_url": "file:///etc"}), 400, "admin_url")
    refused(client.post("/pin", json={"namespace": NS.hex(), "hashes": ["zz"]}), 400, "non-hexadecimal")
    refused(client.post("/pin", json={"namespace": NS.hex(), "hashes": ["00"]}), 400, "16 bytes")
    refused(client.post("/clear", json={"instance": 5}), 400, "bad request")
    refused(client.post("/lookup", content=b"{}", headers={"Content-Length": "x"}), 400, "Content-Length")
    refused(client.post("/holders", json={"namespace": "q", "hashes": []}), 400, "non-hexadecimal")
    refused(client.delete("/instances/nobody"), 404, "no instance 'nobody'")
    assert [i["id"] for i in client.get("/instances").json()] == ["a"]


def test_actions_name_what_is_wrong(client):
    client.post("/register", json=registration("a"))
    post_msgpack(client, "/snapshot", {"id": "a", "seq": 0, "tiers": {}})
    assert client.post("/move", json={"tokens": TOKENS, "model": "m"}).status_code == 400
    assert client.post("/move", json={"source": "a", "dest": "zz", "tokens": TOKENS, "model": "m"}).status_code == 404
    assert "advertise" in client.post("/move", json={"source": "a", "dest": "a", "tokens": TOKENS,
                                                     "model": "m"}).json()["detail"]  # fmt: skip
    assert client.post("/pin", json={"instance": "nobody", "tokens": TOKENS, "model": "m"}).status_code == 404
    assert client.post("/pin", json={"tokens": TOKENS, "model": "m"}).json() == {
        "pinned": {"a": "no admin API (admin.port is 0)"}
    }
