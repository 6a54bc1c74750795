"""remote max_object: a get refuses an object over the bound with an error naming both, and nothing else breaks.

Real servers first (redis-server alone, in a cluster and behind a sentinel; moto's S3 server; a
directory for fs://), then a fake S3 endpoint whose replies lie about their size. (kvtier:// is
tested with its server, tests/server.)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kvtier.codec.framing import encode_object
from kvtier.codec.raw import RawCodec
from kvtier.errors import TierError
from kvtier.storage.remote.store import Buffer, ObjectStore, StoreOptions
from kvtier.storage.remote.tier import RemoteOptions, RemoteTier
from tests.conftest import SMALL, key, random_kv
from tests.remote.conftest import open_with, url_of
from tests.remote.servers import S3_ENV

BOUND = 4096  # bytes: max_object of the stores under test
BACKENDS = ["redis", "redis+cluster", "redis+sentinel", "s3", "fs"]


@pytest.fixture(params=BACKENDS)
def bounded_url(request, servers, tmp_path) -> str:
    return url_of(request.param, servers, tmp_path)


def bounded(url: str, max_object: int = BOUND) -> ObjectStore:
    return open_with(url, StoreOptions(connect_timeout=2.0, max_object=max_object))


def test_get_refuses_objects_over_max_object_and_reads_the_rest_exactly(bounded_url, keyspace):
    store = bounded(bounded_url)
    objects = {1: os.urandom(100), 2: os.urandom(BOUND), 3: os.urandom(BOUND + 1), 4: os.urandom(1 << 20)}
    try:
        for i, blob in objects.items():
            store.put(keyspace(i), [blob[:10], blob[10:]], 5.0)
        assert _bytes(store.get([keyspace(1), keyspace(2)], 5.0)) == [objects[1], objects[2]]  # 2: exactly BOUND
        for i in (3, 4):
            refused = rf"is {len(objects[i])} bytes, over remote max_object \({BOUND} bytes\)"
            with pytest.raises(TierError, match=refused):
                store.get([keyspace(1), keyspace(i)], 5.0)
        # the refusals left the store (and its connections) in order: the other keys still read bit-exact
        assert _bytes(store.get([keyspace(2), keyspace(9), keyspace(1)], 5.0)) == [objects[2], None, objects[1]]
        assert store.exists([keyspace(i) for i in (1, 2, 3, 4)], 5.0) == [True] * 4
        assert store.delete(keyspace(4), 5.0)
    finally:
        store.close()


def _bytes(values: list[Buffer | None]) -> list[bytes | None]:
    return [None if v is None else bytes(v) for v in values]


def test_tier_counts_an_object_over_max_object_as_a_failed_get(bounded_url, keyspace, caplog):
    fits, over = random_kv(SMALL, 4, seed=1), random_kv(SMALL, 8, seed=2)
    size = sum(memoryview(part).nbytes for part in encode_object(keyspace(1), SMALL, RawCodec(), fits))
    options = RemoteOptions(lookup_timeout=2.0, timeout=5.0, backoff=0.01, backoff_max=0.01)
    tier = RemoteTier(bounded(bounded_url, max_object=size), SMALL, RawCodec(), options)  # `fits` is exactly max_object
    try:
        assert tier.put(keyspace(1), fits) and tier.put(keyspace(2), over)
        assert torch.equal(tier.get(keyspace(1)), fits)
        with caplog.at_level(logging.WARNING, logger="kvtier.storage.remote"):
            assert tier.get(keyspace(2)) is None
        assert f"over remote max_object ({size} bytes)" in caplog.text
        assert tier.stats.errors == 1 and tier.stats.misses == 1 and tier.stats.corrupt == 0
        time.sleep(0.02)  # past the breaker's pause
        assert torch.equal(tier.get(keyspace(1)), fits) and tier.stats.hits == 2
        tier.check()
    finally:
        tier.close()


# --- an S3 endpoint whose replies lie -----------------------------------------------------------


class LyingS3:
    """An endpoint that answers each request with the next canned reply, then holds the connection
    open for a second (a reader that waited for a promised body would stall) or closes it."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, bool]] = []  # (reply, hold the connection open afterwards)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                reply, hold = self.replies.pop(0)
                conn.sendall(reply)
                if hold:
                    time.sleep(1.0)

    def get(self, reply: bytes, hold: bool = True) -> tuple[float, Exception]:
        """The seconds a bounded S3 store's get took to fail on `reply`, and its exception."""
        self.replies.append((reply, hold))
        store = bounded(f"s3://bucket/p?endpoint=http://127.0.0.1:{self.port}&region=us-east-1")
        start = time.monotonic()
        try:
            with pytest.raises(Exception) as caught:
                store.get([key(1)], 5.0)
        finally:
            store.close()
        return time.monotonic() - start, caught.value

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def lying_s3(monkeypatch) -> Iterator[LyingS3]:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    server = LyingS3()
    yield server
    server.close()


def _reply(headers: str, body: bytes) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: binary/octet-stream\r\n{headers}\r\n".encode() + body


def test_s3_declared_size_over_max_object_is_refused_before_the_body(lying_s3):
    seconds, error = lying_s3.get(_reply("Content-Length: 2147483648\r\n", b"x" * 100))
    assert isinstance(error, TierError) and "is 2147483648 bytes, over remote max_object (4096 bytes)" in str(error)
    assert seconds < 0.9, "it waited for the body"


def test_s3_reply_without_content_length_is_refused(lying_s3):
    _, error = lying_s3.get(_reply("Transfer-Encoding: chunked\r\n", b"a\r\n0123456789\r\n0\r\n\r\n"))
    assert isinstance(error, TierError) and "no Content-Length" in str(error)


def test_s3_body_longer_than_declared_is_refused(lying_s3):
    # chunked framing wins over Content-Length in HTTP/1.1, so the body can run past what was declared
    body = b"14\r\n" + b"y" * 20 + b"\r\n0\r\n\r\n"
    _, error = lying_s3.get(_reply("Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", body))
    assert isinstance(error, TierError) and "not the 10 bytes its Content-Length declares" in str(error)


def test_s3_body_shorter_than_declared_is_an_error(lying_s3):
    _, error = lying_s3.get(_reply("Content-Length: 1000\r\n", b"z" * 10), hold=False)
    assert isinstance(error, TierError) and "not the 1000 bytes its Content-Length declares" in str(error)
