"""The per-instance admin API in process (FastAPI's TestClient)."""

from __future__ import annotations

import pytest

from kvtier import Config
from kvtier.node import Node
from tests.conftest import SMALL, random_kv

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from kvtier.api import create_admin_app


@pytest.fixture
def node():
    with Node(Config.from_dict({"chunk_size": 4}), SMALL) as node:
        yield node


def test_token_guards_everything_but_health_and_metrics(node):
    client = TestClient(create_admin_app(node, token="t0k"))
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/metrics").status_code == 200
    assert client.get("/stats").status_code == 401
    assert client.post("/clear").status_code == 401
    assert client.get("/stats", headers={"Authorization": "Bearer t0k"}).json()["engine"]["lookups"] == 0


def test_pin_unpin_clear_and_bad_bodies(node):
    engine = node.engine
    client = TestClient(create_admin_app(node))
    engine.store(list(range(8)), random_kv(SMALL, 8))
    keys = [c.key for c in engine.chunks(list(range(8)))]
    body = {"namespace": keys[0].namespace.hex(), "hashes": [k.digest.hex() for k in keys]}
    assert client.post("/pin", json=body).json() == {"keys": 2}
    assert client.post("/clear").json() == {"removed": 0}  # pinned chunks stay
    assert client.post("/unpin", json=body).json() == {"keys": 2}
    assert client.post("/clear").json() == {"removed": 2}
    assert client.post("/pin", json={"namespace": "zz", "hashes": []}).status_code == 400
    assert client.post("/pin", json={"namespace": "00" * 16, "hashes": ["00"]}).status_code == 400
    assert client.post("/fetch", json=body).status_code == 400  # no address
    assert client.get("/config").json()["chunk_size"] == 4
