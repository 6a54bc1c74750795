"""What each request does: decode its metadata, act on the ObjectCache, build the reply.

Socket I/O, framing and connection lifetimes belong to server.py; this module sees whole frames.
Hashing and disk I/O run in a thread pool so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import msgspec

from kvtier.errors import CorruptObjectError
from kvtier.keys import ChunkKey
from kvtier.server.config import ServerConfig
from kvtier.server.protocol import (
    REPLY_BIT,
    VERSION,
    DeleteReply,
    ErrorCode,
    ExistsReply,
    FrameHeader,
    GetReply,
    HealthReply,
    Hello,
    HelloReply,
    KeyMeta,
    KeysMeta,
    Op,
    ProtocolError,
    PutReply,
    Stats,
    chunk_key,
    decode_meta,
    encode_meta,
)
from kvtier.server.store import ObjectCache
from kvtier.version import __version__

T = TypeVar("T")


@dataclass(slots=True)
class Frame:
    """A received request: its header, metadata bytes and body."""

    header: FrameHeader
    meta: bytearray
    body: memoryview  # writable; a PUT body becomes the stored object as it is


@dataclass(slots=True)
class Reply:
    """A reply to send: opcode, metadata bytes, body buffers (sent as they are), close afterwards?"""

    op: int
    meta: bytes
    body: list[memoryview] = field(default_factory=list)
    close: bool = False


@dataclass(slots=True)
class ServerStats:
    """Server-wide counters (monotonic, except the `connections` gauge)."""

    connections: int = 0  # gauge: open client connections
    connections_total: int = 0  # connections accepted
    connections_refused: int = 0  # logins refused with BUSY (main pool full, no room to make)
    connections_evicted: int = 0  # idle connections closed to make room for a less crowded address
    pending_dropped: int = 0  # connections not logged in, closed to make room for newer ones
    login_timeouts: int = 0  # connections closed for not logging in within login_timeout
    uploads_refused: int = 0  # request bodies refused with BUSY: no room in max_inflight_bytes
    uploads_preempted: int = 0  # uploads cut (BUSY) to give room to an address holding less
    requests: int = 0  # frames handled, including those answered with an error
    hits: int = 0  # GET keys found
    misses: int = 0  # GET keys absent
    puts: int = 0  # objects stored
    invalid_objects: int = 0  # PUTs refused because the object was not valid for its key
    errors: int = 0  # error replies sent (any code)
    timeouts: int = 0  # connections closed for an idle or slow (under min_rate) client
    bytes_in: int = 0  # request bytes received
    bytes_out: int = 0  # reply bytes sent


class Handlers:
    """The request table of one server: opcode -> coroutine."""

    def __init__(self, config: ServerConfig, cache: ObjectCache, executor: Executor, stats: ServerStats) -> None:
        self.config = config
        self.cache = cache
        self.stats = stats
        self._executor = executor
        self._token = config.token.encode()
        self._started = time.monotonic()
        self._table: dict[int, Callable[[Frame], Awaitable[Reply]]] = {
            Op.HELLO: self._hello,
            Op.PUT: self._put,
            Op.GET: self._get,
            Op.EXISTS: self._exists,
            Op.DELETE: self._delete,
            Op.STATS: self._stats,
            Op.HEALTH: self._health,
        }

    async def handle(self, frame: Frame) -> Reply:
        """The reply to `frame`; ProtocolError for a request the server refuses.

        A HELLO that returns normally authenticates its connection (the server gates the others).
        """
        op = frame.header.op
        handler = self._table.get(op)
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown opcode {op}")
        if frame.body and op != Op.PUT:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{Op(op).name} takes no body")
        return await handler(frame)

    async def _hello(self, frame: Frame) -> Reply:
        hello = decode_meta(Hello, frame.meta)
        if self._token and not hmac.compare_digest(hello.token.encode(), self._token):
            raise ProtocolError(ErrorCode.AUTH_FAILED, "wrong token")
        c = self.config
        return _reply(Op.HELLO, HelloReply("kvtier", VERSION, bool(self._token), c.max_frame, c.max_meta, c.max_keys))

    async def _put(self, frame: Frame) -> Reply:
        key = chunk_key(decode_meta(KeyMeta, frame.meta).key)
        try:
            memory, disk = await self._run(self.cache.put, key, frame.body)
        except CorruptObjectError as exc:
            self.stats.invalid_objects += 1
            raise ProtocolError(ErrorCode.INVALID_OBJECT, str(exc)) from None
        if not (memory or disk):
            raise ProtocolError(ErrorCode.NO_SPACE, f"no tier has room for an object of {len(frame.body)} bytes")
        self.stats.puts += 1
        return _reply(Op.PUT, PutReply(memory, disk))

    async def _get(self, frame: Frame) -> Reply:
        keys = self._keys(frame)
        found = [self.cache.get_memory(key) for key in keys]
        missing = [i for i, obj in enumerate(found) if obj is None]
        if missing and self.cache.has_disk:
            loaded = await self._run(self.cache.get_disk, [keys[i] for i in missing])
            for i, obj in zip(missing, loaded, strict=True):
                found[i] = obj
        # an object is a uint8 tensor, or (from a peer's tiers) the buffers of one, sent back to back
        parts = [None if obj is None else _buffers(obj) for obj in found]
        sizes = [-1 if p is None else sum(b.nbytes for b in p) for p in parts]
        hits = len(keys) - sizes.count(-1)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        body = [b for p in parts if p is not None for b in p]  # views of the stored bytes
        return _reply(Op.GET, GetReply(sizes), body)

    async def _exists(self, frame: Frame) -> Reply:
        keys = self._keys(frame)
        present = [self.cache.in_memory(key) for key in keys]
        missing = [i for i, here in enumerate(present) if not here]
        if missing and self.cache.has_disk:
            on_disk = await self._run(self.cache.on_disk, [keys[i] for i in missing])
            for i, here in zip(missing, on_disk, strict=True):
                present[i] = here
        return _reply(Op.EXISTS, ExistsReply(present))

    async def _delete(self, frame: Frame) -> Reply:
        key = chunk_key(decode_meta(KeyMeta, frame.meta).key)
        return _reply(Op.DELETE, DeleteReply(await self._run(self.cache.delete, key)))

    async def _stats(self, frame: Frame) -> Reply:
        decode_meta(dict[str, Any], frame.meta)
        stats: Stats = {"server": {**asdict(self.stats), "uptime_s": self._uptime()}, **self.cache.stats()}
        return _reply(Op.STATS, stats)

    async def _health(self, frame: Frame) -> Reply:
        decode_meta(dict[str, Any], frame.meta)
        return _reply(Op.HEALTH, HealthReply("ok", __version__, self._uptime()))

    def _keys(self, frame: Frame) -> list[ChunkKey]:
        keys = decode_meta(KeysMeta, frame.meta).keys
        if len(keys) > self.config.max_keys:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{len(keys)} keys; at most {self.config.max_keys} per request")
        return [chunk_key(k) for k in keys]

    def _uptime(self) -> float:
        return round(time.monotonic() - self._started, 3)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _buffers(obj: Any) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in obj] if isinstance(obj, (list, tuple)) else [obj.numpy().data]


def _reply(op: Op, meta: msgspec.Struct | Stats, body: list[memoryview] | None = None) -> Reply:
    return Reply(op | REPLY_BIT, encode_meta(meta), body or [])
