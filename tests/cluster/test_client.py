"""Answers over HTTP are read up to a bound: a larger one is an error (a miss for the peer tier), not
an allocation. Real sockets: a tiny HTTP server answering what each test asks."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvtier.cluster import forward
from kvtier.cluster.client import ControllerClient, ControllerUnavailable, read_bounded
from kvtier.cluster.peer import MAX_LOOKUP_ANSWER, PeerStore
from kvtier.cluster.state import Instance, Registration
from tests.conftest import key


class Answers(ThreadingHTTPServer):
    body = b"{}"
    length = True  # send a Content-Length (else the body ends when the connection closes)
    seen: list[dict[str, str]]


class Handler(BaseHTTPRequestHandler):
    server: Answers

    def _answer(self) -> None:
        self.server.seen.append(dict(self.headers))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.server.length:
            self.send_header("Content-Length", str(len(self.server.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Answers]:
    httpd = Answers(("127.0.0.1", 0), Handler)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_read_bounded():
    assert read_bounded(io.BytesIO(b"x" * 10), 10, "what") == b"x" * 10
    with pytest.raises(ControllerUnavailable, match="what: answer over 10 bytes"):
        read_bounded(io.BytesIO(b"x" * 11), 10, "what")


@pytest.mark.parametrize("length", [True, False])
def test_an_answer_over_the_bound_is_an_error(server, length):
    server.length = length
    url = f"http://127.0.0.1:{server.server_address[1]}"
    client = ControllerClient(url, token="t0k")
    server.body = json.dumps({"status": "ok", "pad": "x" * 1000}).encode()
    assert client.request("/heartbeat", {"id": "a"}, timeout=5, limit=2000)["status"] == "ok"
    assert server.seen[-1]["Authorization"] == "Bearer t0k"
    with pytest.raises(ControllerUnavailable, match="over 500"):
        client.request("/heartbeat", {"id": "a"}, timeout=5, limit=500)
    entry = b'{"id": "x", "address": "", "chunks": 1}'  # serves no peers
    server.body = b'{"instances": [' + b",".join([entry] * 1000) + b"]}"
    store = PeerStore(client, "me")
    assert store.exists([key(1)], timeout=5) == [False]  # within MAX_LOOKUP_ANSWER
    server.body = b" " * (MAX_LOOKUP_ANSWER + 1)
    with pytest.raises(ControllerUnavailable, match=f"/lookup: answer .*over {MAX_LOOKUP_ANSWER}"):
        store.exists([key(1)], timeout=5)
    server.body = b'{"instances": [{"id": "x"}]}'
    with pytest.raises(ControllerUnavailable, match="malformed answer"):
        store.exists([key(1)], timeout=5)


def test_the_controller_reads_bounded_answers_from_admin_apis(server):
    reg = Registration(id="a", model="m", namespace="00" * 16, chunk_size=4, hash="xxh128", save_partial=True,
                       heartbeat_s=1.0, admin_url=f"http://127.0.0.1:{server.server_address[1]}")  # fmt: skip
    inst = Instance(reg, 0, 0.0, 0.0)
    server.body = json.dumps({"removed": 3}).encode()
    assert asyncio.run(forward.post_all([inst], "/clear", {}, "removed")) == {"a": 3}
    server.body = json.dumps({"removed": 3, "pad": "x" * forward.MAX_ANSWER}).encode()
    answer = asyncio.run(forward.post_all([inst], "/clear", {}, "removed"))["a"]
    assert answer.startswith("failed: ") and f"answer over {forward.MAX_ANSWER} bytes" in answer
