"""TLS (kvtiers://) with a certificate made by the test, the bind rule, and the client's reply bounds."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest

from kvtier.errors import ConfigError
from kvtier.server.client import KVTierClient, open_store
from kvtier.server.config import ServerConfig
from kvtier.server.protocol import HEADER_SIZE, ErrorCode, HelloReply, Op, ProtocolError, encode_meta, pack_header
from kvtier.server.server import ServerThread
from kvtier.storage.remote.store import StoreOptions
from kvtier.tls import ClientTLS, client_context
from tests.server.conftest import FAST, RawClient, frame, make_object

K, OBJ = make_object(1)


@pytest.fixture
def tls_server(start_server, certs):
    return start_server(tls_cert=certs.cert, tls_key=certs.key, memory=16 << 20)


def test_kvtiers_round_trip_is_bit_exact(tls_server, certs):
    assert tls_server.url.startswith("kvtiers://127.0.0.1:")
    store = open_store(urlsplit(tls_server.url), StoreOptions(tls=ClientTLS(ca=certs.ca)))
    try:
        big_key, big = make_object(2, tokens=20_000)  # 5 MB: many TLS records each way
        store.put(K, [OBJ], 5.0)
        store.put(big_key, [big], 5.0)
        got = store.get([K, big_key, make_object(3)[0]], 5.0)
        assert bytes(got[0]) == OBJ and bytes(got[1]) == big and got[2] is None
        assert store.exists([K, make_object(3)[0]], 5.0) == [True, False]
    finally:
        store.close()


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_server, certs):
    host, port = tls_server.address
    stranger = KVTierClient(host, port, tls=client_context(certs.other_ca), options=StoreOptions(connect_timeout=2))
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.exists([K], 2.0)
    stranger.close()
    unchecked = KVTierClient(host, port, tls=client_context(certs.other_ca, verify=False))
    assert unchecked.exists([K], 2.0) == [False]  # tls.verify = false: encrypted, not authenticated
    unchecked.close()


def test_plain_clients_and_garbage_do_not_hurt_a_tls_server(tls_server, certs):
    host, port = tls_server.address
    plain = KVTierClient(host, port, options=StoreOptions(connect_timeout=2))
    with pytest.raises((OSError, ProtocolError)):
        plain.exists([K], 1.0)
    plain.close()
    junk = RawClient(tls_server.address)
    junk.send(b"\x16\x03\x01" + bytes(range(256)) * 4)  # a broken ClientHello
    assert junk.closed()
    good = KVTierClient(host, port, tls=client_context(certs.ca))
    good.put(K, [OBJ], 5.0)
    assert bytes(good.get([K], 5.0)[0]) == OBJ
    good.close()


def test_a_tls_client_to_a_plain_server_fails_cleanly(server, certs):
    host, port = server.address
    client = KVTierClient(host, port, tls=client_context(certs.ca), options=StoreOptions(connect_timeout=1))
    with pytest.raises((OSError, TimeoutError)):
        client.exists([K], 1.0)
    client.close()


def test_an_unreadable_certificate_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tls_cert"):
        ServerThread(ServerConfig(port=0, tls_cert=str(tmp_path / "missing.pem"))).start()


# --- the bind rule -------------------------------------------------------------------------------


def test_binding_beyond_loopback_needs_a_token():
    with pytest.raises(ConfigError, match="needs a token"):
        ServerThread(ServerConfig(host="0.0.0.0", port=0)).start()
    with ServerThread(ServerConfig(host="0.0.0.0", port=0, token="tok")) as thread:
        assert thread.address[1] > 0


def test_the_cli_refuses_a_public_bind_without_a_token():
    cmd = [sys.executable, "-m", "kvtier", "server", "--host", "0.0.0.0", "--port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"KVTIER_SERVER_TOKEN": ""} | _env())
    assert done.returncode == 2 and "needs a token" in done.stderr and "--token-file" in done.stderr


def test_a_loopback_server_without_a_token_warns(caplog, start_server):
    start_server()
    assert any("has no token" in r.getMessage() for r in caplog.records)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.getcwd()}


# --- a hostile server: the client bounds what it allocates ------------------------------------------


def test_a_reply_declaring_a_huge_object_is_refused_before_allocation():
    """A fake server (fault injection) answers HELLO, then a GET with a 1 TiB object."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            hello = HelloReply("kvtier", 1, False, FAST.max_frame, FAST.max_meta, FAST.max_keys)
            for op, meta, body_len in ((Op.HELLO, encode_meta(hello), 0), (Op.GET, None, 1 << 40)):
                head = conn.recv(HEADER_SIZE)
                request_id = int.from_bytes(head[8:12], "little")
                conn.recv(int.from_bytes(head[12:16], "little"))
                payload = meta if meta is not None else frame(Op.GET, {"sizes": [1 << 40]})[HEADER_SIZE:]
                conn.sendall(pack_header(op | 0x80, request_id, len(payload), body_len) + payload)
            conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = KVTierClient(*listener.getsockname()[:2], options=StoreOptions(max_object=64 << 20))
    with pytest.raises(ProtocolError) as raised:
        client.get([K], 2.0)
    assert raised.value.code is ErrorCode.FRAME_TOO_LARGE and "limit is 67108864" in str(raised.value)
    client.close()
    listener.close()
