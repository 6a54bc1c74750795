"""The kvtier server's client: an ObjectStore for `kvtier://[:token@]host:port` URLs (kvtiers://: TLS).

Thread-safe: each call borrows one connection from a pool of at most `max_connections` (see
connection.py), so a request thread and a background writer can use one client at once. `get`
receives each object with recv_into straight into its own uninitialized buffer (no zero-fill, no
copy: measured 2x faster than bytearrays, whose zeroing touched every page twice); `put` sends the
caller's buffers as they are with one sendmsg. Absent keys are None/False; every failure raises
(OSError, TimeoutError or a TierError such as ServerError).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult, unquote

import msgspec

from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.server.connection import Connection, Pool
from kvtier.server.protocol import (
    DEFAULT_PORT,
    HEADER_SIZE,
    DeleteReply,
    ErrorCode,
    ExistsReply,
    GetReply,
    HealthReply,
    KeyMeta,
    KeysMeta,
    Op,
    ProtocolError,
    PutReply,
    ServerError,
    Stats,
    decode_meta,
    encode_meta,
    wire_key,
)
from kvtier.storage.remote.store import Buffer, StoreFactory, StoreOptions

TOKEN_ENV = "KVTIER_SERVER_TOKEN"


class KVTierClient:
    """Client of one kvtier server (the ObjectStore protocol, plus stats() and health())."""

    scheme = "kvtier"

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        token: str = "",
        options: StoreOptions | None = None,
        socket_buffer: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.options = options or StoreOptions()
        self.where = f"{'kvtiers' if tls else 'kvtier'}://{f'[{host}]' if ':' in host else host}:{port}"
        self._address = (host, port)
        self._token = token
        self._socket_buffer = socket_buffer  # bytes of SO_SNDBUF/SO_RCVBUF; 0 = the kernel's autotuning
        self._tls = tls  # TLS to the server (its certificate checked against `host`); None = plain TCP
        self._pool = Pool(self._connect, self.options.max_connections, self.where)

    def __repr__(self) -> str:
        return f"KVTierClient({self.where})"

    def _connect(self, deadline: float) -> Connection:
        return Connection.open(
            self._address, self._token, self.options.connect_timeout, deadline, self._socket_buffer, self._tls
        )

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        """Which of `keys` the server holds (memory or disk), in one round trip per max_keys keys."""
        if not keys:
            return []
        deadline = time.monotonic() + timeout
        out: list[bool] = []
        with self._pool.connection(deadline) as conn:
            for batch in _batches(keys, conn.limits.max_keys):
                header, meta = conn.request(Op.EXISTS, KeysMeta([wire_key(k) for k in batch]), (), deadline)
                conn.expect_no_body(header)
                present = decode_meta(ExistsReply, meta).present
                _check_count(len(present), len(batch))
                out += present
        return out

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        """The objects under `keys` (None where absent), each received into its own writable buffer."""
        if not keys:
            return []
        deadline = time.monotonic() + timeout
        out: list[Buffer | None] = []
        with self._pool.connection(deadline) as conn:
            for batch in _batches(keys, conn.limits.max_keys):
                header, meta = conn.request(Op.GET, KeysMeta([wire_key(k) for k in batch]), (), deadline)
                sizes = decode_meta(GetReply, meta).sizes
                _check_sizes(sizes, len(batch), header.body_len, self.options.max_object)
                out += [None if size < 0 else conn.read_body(size, deadline) for size in sizes]
        return out

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        """Store the concatenation of `parts` (a framed object) under `key`; ServerError if refused."""
        deadline = time.monotonic() + timeout
        views = [memoryview(part).cast("B") for part in parts]
        size = sum(view.nbytes for view in views)
        request = KeyMeta(wire_key(key))
        with self._pool.connection(deadline) as conn:
            limit = conn.limits.max_frame
            if HEADER_SIZE + len(encode_meta(request)) + size > limit:  # the server would refuse it unread
                raise ServerError(ErrorCode.FRAME_TOO_LARGE, f"object of {size} bytes exceeds the max frame {limit}")
            header, meta = conn.request(Op.PUT, request, views, deadline)
            conn.expect_no_body(header)
            decode_meta(PutReply, meta)

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        """Remove `key` from the server; True if it was there."""
        deadline = time.monotonic() + timeout
        with self._pool.connection(deadline) as conn:
            header, meta = conn.request(Op.DELETE, KeyMeta(wire_key(key)), (), deadline)
            conn.expect_no_body(header)
            return decode_meta(DeleteReply, meta).deleted

    def stats(self, timeout: float = 5.0) -> Stats:
        """The server's counters: {"server": {...}, "memory": {...}, "disk": {...}}."""
        deadline = time.monotonic() + timeout
        with self._pool.connection(deadline) as conn:
            header, meta = conn.request(Op.STATS, None, (), deadline)
            conn.expect_no_body(header)
            return decode_meta(Stats, meta)

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        """{"status": "ok", "version": ..., "uptime_s": ...} from a live server."""
        deadline = time.monotonic() + timeout
        with self._pool.connection(deadline) as conn:
            header, meta = conn.request(Op.HEALTH, None, (), deadline)
            conn.expect_no_body(header)
            return msgspec.structs.asdict(decode_meta(HealthReply, meta))

    def close(self) -> None:
        """Close the connections; the client is unusable afterwards."""
        self._pool.close()


def open_store(url: SplitResult, options: StoreOptions) -> KVTierClient:
    """The client of `kvtier[s]://[:token@]host[:port]` (kvtiers: TLS, checked as `options.tls` says);
    without a token in the URL, $KVTIER_SERVER_TOKEN."""
    if url.scheme not in ("kvtier", "kvtiers"):
        raise ConfigError(f"not a kvtier:// URL: {url.scheme}://")
    if not url.hostname:
        raise ConfigError("a kvtier:// URL needs a host: kvtier://[:token@]host:port")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError("a kvtier:// URL has no path, query or fragment: kvtier://[:token@]host:port")
    if url.username and url.password is None:
        raise ConfigError("put the token after a colon: kvtier://:TOKEN@host:port")
    try:
        port = url.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigError(f"kvtier:// URL: {exc}") from None
    token = unquote(url.password) if url.password else os.environ.get(TOKEN_ENV, "")
    tls = options.tls.context() if url.scheme == "kvtiers" else None
    return KVTierClient(url.hostname, port, token, options, tls=tls)


def _batches(keys: Sequence[ChunkKey], size: int) -> list[Sequence[ChunkKey]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _check_count(got: int, expected: int) -> None:
    if got != expected:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"reply has {got} entries for {expected} keys")


def _check_sizes(sizes: list[int], expected: int, body_len: int, max_object: int) -> None:
    """A GET reply must describe exactly its body, in objects of at most `max_object` bytes, before
    the client allocates anything for it."""
    _check_count(len(sizes), expected)
    if any(size < -1 for size in sizes):
        raise ProtocolError(ErrorCode.BAD_FRAME, "GET reply with a negative object size")
    if any(size > max_object for size in sizes):
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"GET reply with an object of {max(sizes)} bytes; the limit is {max_object}"
        )
    if sum(size for size in sizes if size > 0) != body_len:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"GET reply sizes do not add up to its body of {body_len} bytes")


_FACTORY: StoreFactory = open_store  # lets mypy check that KVTierClient is an ObjectStore
