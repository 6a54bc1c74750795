"""Helpers for the kvtier server tests: real objects, servers on free loopback ports, raw sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest

from kvtier.codec.framing import encode_object
from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.server.client import KVTierClient
from kvtier.server.config import ServerConfig
from kvtier.server.protocol import HEADER_SIZE, Op, pack_header, unpack_header, wire_key
from kvtier.server.server import ServerThread
from kvtier.storage.remote.store import StoreOptions
from tests.conftest import SMALL, key, random_kv

TOKENS = 4
OBJECT_SIZE = 128 + random_kv(SMALL, TOKENS).nbytes  # 640 bytes: header + 4 tokens of SMALL
FAST = ServerConfig(port=0, memory=1 << 20, io_timeout=2.0, idle_timeout=30.0, workers=2)


def make_object(i: int, namespace: int = 0, tokens: int = TOKENS) -> tuple[ChunkKey, bytes]:
    """A real framed kvtier object under key(i, namespace), with distinct contents per i."""
    k = key(i, namespace)
    return k, object_for(k, seed=i + 1000 * namespace, tokens=tokens)


def object_for(k: ChunkKey, seed: int, tokens: int = TOKENS) -> bytes:
    """The bytes of a real framed object stored under `k`."""
    header, payload = encode_object(k, SMALL, RawCodec(), random_kv(SMALL, tokens, seed=seed))
    return header + bytes(payload)


def frame(op: int, meta: object = None, body: bytes = b"", request_id: int = 1) -> bytes:
    """A request frame's bytes (meta: a msgspec Struct or any msgpack-able value)."""
    meta_bytes = b"" if meta is None else msgspec.msgpack.encode(meta)
    return pack_header(op, request_id, len(meta_bytes), len(body)) + meta_bytes + body


def put_frame(k: ChunkKey, obj: bytes, request_id: int = 1) -> bytes:
    return frame(Op.PUT, {"key": wire_key(k)}, obj, request_id)


class RawClient:
    """A bare socket speaking (or abusing) the protocol; closed at the end of the test."""

    opened: ClassVar[list[socket.socket]] = []

    def __init__(self, address: tuple[str, int], timeout: float = 5.0, source: str | None = None) -> None:
        """Connect to `address`, from the loopback address `source` (127.0.0.2 ...) if given."""
        self.sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0) if source else None)
        self.opened.append(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def end(self) -> None:
        """No more bytes from us (the server sees EOF)."""
        self.sock.shutdown(socket.SHUT_WR)

    def reply(self) -> tuple[int, int, dict, bytes] | None:
        """The next reply (op, request id, metadata, body), or None if the server closed the connection."""
        head = self._exactly(HEADER_SIZE)
        if head is None:
            return None
        header = unpack_header(head)
        meta = self._exactly(header.meta_len) or b""
        body = self._exactly(header.body_len) or b""
        return header.op, header.request_id, msgspec.msgpack.decode(meta) if meta else {}, body

    def closed(self) -> bool:
        """Whether the server has closed the connection (reading any replies still in flight first)."""
        try:
            while self.reply() is not None:
                pass
        except (ConnectionError, ValueError):
            pass  # a reset or a reply cut short also means closed
        self.close()
        return True

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                if data:
                    raise ValueError(f"connection closed after {len(data)} of {n} bytes")
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def error_code(reply: tuple[int, int, dict, bytes] | None) -> int | None:
    """The code of an error reply (None for anything else)."""
    if reply is None or reply[0] != Op.ERROR:
        return None
    return int(reply[2]["code"])


@pytest.fixture(autouse=True)
def close_raw_clients() -> Iterator[None]:
    yield
    while RawClient.opened:
        RawClient.opened.pop().close()


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """start_server(**config overrides) -> a running ServerThread, stopped (and checked) at the end."""
    started: list[ServerThread] = []

    def start(**overrides: object) -> ServerThread:
        thread = ServerThread(replace(FAST, **overrides)).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        if thread.server is not None and not thread.server._stopping:
            thread.server.cache.check()
        thread.stop()


@pytest.fixture
def server(start_server) -> ServerThread:
    return start_server()


@pytest.fixture
def make_client() -> Iterator:
    """make_client(address or thread, token="") -> a KVTierClient, closed at the end."""
    made: list[KVTierClient] = []

    def make(where: ServerThread | tuple[str, int], token: str = "", **options: object) -> KVTierClient:
        address = where.address if isinstance(where, ServerThread) else where
        opts = StoreOptions(**{"connect_timeout": 2.0, "max_connections": 4, **options})
        client = KVTierClient(address[0], address[1], token, opts)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(server, make_client) -> KVTierClient:
    return make_client(server)
