"""The per-instance admin API: in process (FastAPI's TestClient), and served (bind rule, HTTPS)."""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request

import pytest

from kvtier import Config
from kvtier.errors import ConfigError
from kvtier.node import Node
from tests.cluster.procs import free_port
from tests.conftest import SMALL, random_kv

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from kvtier.api import TOKEN_ENV, AdminServer, create_admin_app


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


def test_fetch_needs_a_controller_and_a_good_address(node):
    client = TestClient(create_admin_app(node))
    body = {"namespace": "00" * 16, "hashes": ["11" * 16]}
    answer = client.post("/fetch", json=body | {"address": "127.0.0.1:7600"})
    assert answer.status_code == 409 and "no controller" in answer.json()["detail"]
    answer = client.post("/fetch", json=body | {"address": "a:b:c"})
    assert answer.status_code == 400 and "brackets" in answer.json()["detail"]


def test_bodies_over_the_limit_are_refused_unread(node):
    client = TestClient(create_admin_app(node, max_body=1024))
    body = {"namespace": "00" * 16, "hashes": ["11" * 16] * 40}  # ~1.4 KiB
    assert client.post("/pin", json=body).status_code == 413
    chunked = iter([json.dumps(body).encode()[:700], json.dumps(body).encode()[700:]])  # no Content-Length
    answer = client.post("/pin", content=chunked, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.json() == {"detail": "body over 1024 bytes"}
    small = iter([json.dumps(body | {"hashes": ["11" * 16]}).encode()])
    assert client.post("/pin", content=small, headers={"Content-Type": "application/json"}).json() == {"keys": 1}
    assert client.post("/clear", headers={"Content-Length": "1e3"}).status_code == 400


def test_no_token_is_refused_beyond_loopback_and_warned_about_on_it(node, monkeypatch, caplog):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"admin API: binding '0.0.0.0'.*set \$KVTIER_ADMIN_TOKEN"):
        AdminServer(node, "0.0.0.0", free_port())
    with caplog.at_level(logging.WARNING, logger="kvtier.auth"):
        server = AdminServer(node, "127.0.0.1", free_port())
    server.close()
    assert "admin API on 127.0.0.1 has no token" in caplog.text


def test_https_with_tls_cert(certs):
    port = free_port()
    tls = {"cert": certs.cert, "key": certs.key}
    with Node(Config.from_dict({"chunk_size": 4, "admin": {"port": port}, "tls": tls}), SMALL) as node:
        assert node.admin.url == f"https://127.0.0.1:{port}"
        trusting = ssl.create_default_context(cafile=certs.ca)
        with urllib.request.urlopen(node.admin.url + "/health", timeout=10, context=trusting) as r:
            assert json.loads(r.read())["status"] == "ok"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(node.admin.url + "/health", timeout=10,
                                   context=ssl.create_default_context(cafile=certs.other_ca))  # fmt: skip


def test_a_certificate_that_cannot_be_loaded_is_a_config_error(tmp_path):
    config = Config.from_dict({"chunk_size": 4, "admin": {"port": free_port()}, "tls": {"cert": str(tmp_path / "no")}})
    with pytest.raises(ConfigError, match=r"tls\.cert: cannot load certificate"):
        Node(config, SMALL)
