"""The client backend: deadlines, discarded connections, reconnects, URLs, thread-safe pooling."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from kvtier.errors import ConfigError, TierError
from kvtier.server.client import open_store
from kvtier.server.protocol import HEADER_SIZE, HelloReply, Op, encode_meta, pack_header, unpack_header
from kvtier.storage.remote.store import StoreOptions
from tests.conftest import key
from tests.server.conftest import make_object


def test_calls_time_out_on_a_server_that_never_answers(make_client):
    with socket.create_server(("127.0.0.1", 0)) as mute:  # listens, never accepts or answers
        client = make_client(mute.getsockname())
        k, obj = make_object(1)
        calls = [lambda: client.exists([k], 0.3), lambda: client.get([k], 0.3), lambda: client.put(k, [obj], 0.3)]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                call()
            assert 0.25 < time.monotonic() - started < 0.8


def test_unreachable_server_fails_fast(make_client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()  # bound, not listening: connections are refused
        client = make_client(address)
        started = time.monotonic()
        with pytest.raises(OSError):
            client.exists([key(1)], 2.0)
        assert time.monotonic() - started < 1.0


def test_busy_pool_respects_the_deadline(make_client):
    with socket.create_server(("127.0.0.1", 0)) as mute:
        client = make_client(mute.getsockname(), max_connections=1)
        failures: list[BaseException] = []

        def hold() -> None:  # occupies the only connection for a second
            try:
                client.exists([key(1)], 1.0)
            except TimeoutError as exc:
                failures.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="busy"):
            client.exists([key(2)], 0.2)
        assert time.monotonic() - started < 0.6
        holder.join()
        assert len(failures) == 1


class HalfReplyServer:
    """Answers HELLO, then sends half a reply header to every request and stalls."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            header = self._read_request(conn)
            meta = encode_meta(HelloReply("fake", 1, False, 1 << 20, 1 << 16, 64))
            conn.sendall(pack_header(Op.HELLO | 0x80, header.request_id, len(meta), 0) + meta)
            while True:
                header = self._read_request(conn)
                conn.sendall(pack_header(Op.EXISTS | 0x80, header.request_id, 10, 0)[:12])
        except (OSError, ValueError):
            return

    @staticmethod
    def _read_request(conn: socket.socket):
        head = conn.recv(HEADER_SIZE, socket.MSG_WAITALL)
        if len(head) < HEADER_SIZE:
            raise ValueError("client went away")
        header = unpack_header(head)
        conn.recv(header.meta_len + header.body_len, socket.MSG_WAITALL)
        return header

    def close(self) -> None:
        self.listener.close()
        for conn in self._conns:
            conn.close()


def test_a_connection_that_failed_mid_reply_is_never_reused(make_client):
    fake = HalfReplyServer()
    try:
        client = make_client(fake.listener.getsockname(), max_connections=1)
        for attempt in (1, 2):
            with pytest.raises(TimeoutError):
                client.exists([key(1)], 0.3)
            assert fake.accepted == attempt  # a fresh connection each time: the half-read one was closed
    finally:
        fake.close()


def test_client_reconnects_after_the_server_restarts(start_server, make_client, tmp_path):
    disk = {"disk_path": str(tmp_path / "d"), "disk_size": 1 << 20}
    first = start_server(**disk)
    client = make_client(first)
    k, obj = make_object(1)
    client.put(k, [obj], 2.0)
    first.stop()
    with pytest.raises(OSError):
        client.get([k], 1.0)  # down: refused, quickly
    start_server(port=first.address[1], **disk)
    assert bytes(client.get([k], 2.0)[0]) == obj


def test_open_store_reads_the_url(start_server, monkeypatch):
    server = start_server(token="p@ss word")
    host, port = server.address
    store = open_store(urlsplit(f"kvtier://:p%40ss%20word@{host}:{port}"), StoreOptions())
    assert store.scheme == "kvtier" and store.where == f"kvtier://{host}:{port}"  # no token in logs
    k, obj = make_object(1)
    store.put(k, [obj], 2.0)
    assert bytes(store.get([k], 2.0)[0]) == obj
    store.close()
    with pytest.raises(TierError, match="closed"):
        store.get([k], 2.0)
    monkeypatch.setenv("KVTIER_SERVER_TOKEN", "p@ss word")
    from_env = open_store(urlsplit(f"kvtier://{host}:{port}"), StoreOptions())
    assert from_env.exists([k], 2.0) == [True]
    from_env.close()
    assert open_store(urlsplit("kvtier://example.com"), StoreOptions()).where == "kvtier://example.com:7480"


@pytest.mark.parametrize(
    "url",
    ["kvtier://", "kvtier://host:1/path", "kvtier://host?x=1", "kvtier://token@host", "kvtier://host:99999"],
)
def test_open_store_rejects_bad_urls(url):
    with pytest.raises(ConfigError):
        open_store(urlsplit(url), StoreOptions())
