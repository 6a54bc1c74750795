"""The kvtier server: an asyncio TCP server of framed requests (protocol.py) over an ObjectCache.

One task per connection reads a frame, has `Handlers` answer it, and sends the reply; bulk bytes are
received with `sock_recv_into` into the buffer that will be stored and sent from views of the stored
bytes, so the event loop copies nothing (stream.py; with TLS, decrypted into that buffer).
admission.py decides who gets a connection and how much request memory each may hold. A reaper
task closes connections past their phase's deadline: not logged in within `login_timeout`, idle
longer than `idle_timeout`, or moving a frame slower than `min_rate` (after a second of grace,
and never longer than `io_timeout`): slowloris. Garbage from one client costs that client its
connection, never anyone else's data. `shutdown()` stops accepting, closes idle connections, lets
requests in flight finish (up to a grace period) and closes the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvtier.auth import check_bind
from kvtier.logutil import BurstLog
from kvtier.server.admission import (
    LOGIN_META,
    UNRESERVED,
    Connections,
    InflightBytes,
    Phase,
    Session,
    configure_socket,
    host_of,
)
from kvtier.server.config import ServerConfig
from kvtier.server.handlers import Frame, Handlers, Reply, ServerStats
from kvtier.server.protocol import (
    HEADER_SIZE,
    ErrorCode,
    ErrorReply,
    FrameHeader,
    Op,
    ProtocolError,
    encode_meta,
    pack_header,
    unpack_header,
)
from kvtier.server.store import ObjectCache
from kvtier.server.stream import Stream, TLSStream
from kvtier.tls import server_context

log = logging.getLogger("kvtier.server")
_GRACE = 1.0  # seconds every frame (or reply) gets besides its size at min_rate
_TOKEN_OPTION = "--token-file or $KVTIER_SERVER_TOKEN"


class KVServer:
    """The server. `await start()`, then `await shutdown()`; see ServerThread to run it in a thread."""

    def __init__(self, config: ServerConfig, cache: ObjectCache | None = None) -> None:
        self.config = config
        self._tls = server_context(config.tls_cert, config.tls_key, "tls_cert") if config.tls_cert else None
        self.cache = cache or ObjectCache(
            config.memory, config.disk_path, config.disk_size, config.policy, config.fsync
        )
        self.stats = ServerStats()
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="kvtier-server")
        self._handlers = Handlers(config, self.cache, self._executor, self.stats)
        self._conns = Connections(config, self.stats)
        self._inflight = InflightBytes(config, self.stats)
        self._burst = BurstLog(log)
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stopped = asyncio.Event()
        self.address: tuple[str, int] = (config.host, config.port)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Bind and start accepting; the bound (host, port). ConfigError beyond loopback without a token."""
        check_bind(self.config.name, self.config.host, self.config.token, _TOKEN_OPTION)
        family = socket.getaddrinfo(self.config.host, self.config.port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((self.config.host, self.config.port), family=family, backlog=1024)
        listener.setblocking(False)
        self._listener = listener
        self.address = listener.getsockname()[:2]
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept_loop(listener)), loop.create_task(self._reap_loop())]
        return self.address

    @property
    def tls(self) -> bool:
        """Whether it serves TLS."""
        return self._tls is not None

    async def wait_stopped(self) -> None:
        """Return once shutdown() has finished."""
        await self._stopped.wait()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, finish requests in flight (up to `grace` seconds), close everything."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()  # after the accept task let go of it
        for conn in self._conns.all():
            if conn.phase is Phase.IDLE:
                conn.cancel(None)
        tasks = [c.task for c in self._conns.all() if c.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for conn in self._conns.all():
                conn.cancel(ErrorCode.SHUTTING_DOWN)
            await asyncio.gather(*late, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self.cache.close()
        self._stopped.set()
        log.info("stopped")

    # --- accepting and reaping -------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: keep serving the open connections
                self._burst.warning("accept", "accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                configure_socket(sock, self.config.socket_buffer)
                host, peer = host_of(addr)
                stream = Stream(sock) if self._tls is None else TLSStream(sock, self._tls)
            except (OSError, ValueError) as exc:  # e.g. reset before we set it up: this one only
                self._burst.warning("setup", "%s: cannot set up the connection: %s", addr, exc)
                sock.close()
                continue
            now = loop.time()
            conn = Session(stream, host, peer, now + self.config.login_timeout, not self.config.token)
            conn.enter(Phase.RECEIVING if self._tls else Phase.IDLE, conn.login_deadline)
            self._conns.add_pending(conn)
            self.stats.connections += 1
            self.stats.connections_total += 1
            conn.task = loop.create_task(self._serve(conn))
            conn.task.add_done_callback(functools.partial(self._closed, conn))  # even if cancelled unstarted

    async def _reap_loop(self) -> None:
        """Close connections past their phase's deadline (see the module docstring)."""
        loop = asyncio.get_running_loop()
        c = self.config
        tick = min(0.25, max(0.02, min(c.idle_timeout, c.io_timeout, c.login_timeout) / 4))
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for conn in self._conns.all():
                if now <= conn.deadline or conn.closing:
                    continue
                if not conn.admitted:
                    self.stats.login_timeouts += 1
                    conn.cancel(None)
                else:
                    self.stats.timeouts += 1
                    conn.cancel(ErrorCode.TIMEOUT if conn.phase is Phase.RECEIVING else None)
                log.debug("%s: %s too long, closing", conn.peer, conn.phase.value)

    def _rate_deadline(self, size: int) -> float:
        """When moving `size` bytes, begun now, must be done: a second plus size at min_rate, within io_timeout."""
        now = asyncio.get_running_loop().time()
        return now + min(self.config.io_timeout, _GRACE + size / self.config.min_rate)

    # --- one connection --------------------------------------------------------------------------

    async def _serve(self, conn: Session) -> None:
        log.debug("%s: connected", conn.peer)
        try:
            await conn.stream.start()
            await self._serve_frames(conn)
        except asyncio.CancelledError:
            if not conn.closing:
                raise  # cancelled by someone else than this server
            if conn.cancel_code is not None:
                conn.stream.send_now(_error_frame(0, conn.cancel_code, f"closing: {conn.cancel_code.name}"))
        except OSError as exc:  # resets, and TLS errors (ssl.SSLError)
            log.debug("%s: %s", conn.peer, exc)
        except Exception:  # a bug must cost one connection, not the server
            log.exception("%s: connection failed", conn.peer)

    def _closed(self, conn: Session, task: asyncio.Task[None]) -> None:
        """Forget a connection whose task ended (however it ended)."""
        self._inflight.release(conn)
        conn.stream.close()
        self._conns.remove(conn)
        self.stats.connections -= 1
        log.debug("%s: closed", conn.peer)

    async def _serve_frames(self, conn: Session) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            idle = loop.time() + self.config.idle_timeout
            conn.enter(Phase.IDLE, idle)
            request_id = 0
            try:
                head = await self._read_head(conn)
                if head is None:
                    return
                header = unpack_header(head)
                request_id = header.request_id
                reply = await self._request(conn, header)
            except ProtocolError as exc:
                reply = self._error(conn, request_id, exc)
            conn.enter(Phase.SENDING, self._rate_deadline(len(reply.meta) + sum(v.nbytes for v in reply.body)))
            await self._send(conn, request_id, reply)
            if reply.close:
                return

    async def _read_head(self, conn: Session) -> bytearray | None:
        """The next frame's header bytes; None when the client closed the connection between frames."""
        head = bytearray(HEADER_SIZE)
        n = await conn.stream.recv_into(memoryview(head))
        if n == 0:
            return None
        conn.enter(Phase.RECEIVING, self._rate_deadline(HEADER_SIZE))
        await _recv_exactly(conn, memoryview(head)[n:], n, HEADER_SIZE)
        return head

    async def _request(self, conn: Session, header: FrameHeader) -> Reply:
        """Read the rest of the frame after `header`, check it and answer it."""
        self._check_frame(conn, header)
        if conn.authenticated and not self._conns.admit(conn):  # no token: the first frame logs in
            raise ProtocolError(ErrorCode.BUSY, "too many connections")
        self.stats.requests += 1
        size = header.meta_len + header.body_len
        reserved = size > UNRESERVED  # small frames ride in the fixed overhead (UNRESERVED per connection)
        if reserved:
            conn.enter(Phase.HANDLING, float("inf"))  # waiting for room in flight is not the client's fault
            await self._inflight.acquire(conn, size)
        try:
            conn.enter(Phase.RECEIVING, self._rate_deadline(size))
            meta = bytearray(header.meta_len)
            await _recv_exactly(conn, memoryview(meta), HEADER_SIZE, HEADER_SIZE + size)
            body = memoryview(b"")
            if header.body_len:
                body = np.empty(header.body_len, dtype=np.uint8).data  # not zero-filled: recv writes it once
                await _recv_exactly(conn, body, HEADER_SIZE + len(meta), HEADER_SIZE + size)
            return await self._handle(conn, Frame(header, meta, body))
        finally:
            if reserved:
                self._inflight.release(conn)

    async def _handle(self, conn: Session, frame: Frame) -> Reply:
        conn.enter(Phase.HANDLING, float("inf"))
        self.stats.bytes_in += HEADER_SIZE + len(frame.meta) + len(frame.body)
        try:
            reply = await self._handlers.handle(frame)
        except ProtocolError:
            raise
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("%s: request %s failed", conn.peer, frame.header.op)
            raise ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc
        if frame.header.op == Op.HELLO and not conn.authenticated:
            conn.authenticated = True
            if not self._conns.admit(conn):
                raise ProtocolError(ErrorCode.BUSY, "too many connections")
        return reply

    def _check_frame(self, conn: Session, header: FrameHeader) -> None:
        """Refuse a frame before reading its metadata and body: too large, or not allowed yet."""
        if not conn.authenticated and (header.op != Op.HELLO or header.body_len):
            raise ProtocolError(ErrorCode.AUTH_REQUIRED, "this server needs a token: send HELLO first")
        if not conn.admitted and header.meta_len > LOGIN_META:  # before login, only a HELLO's token and name
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"a first frame has at most {LOGIN_META} bytes of metadata")
        c, meta_len, body_len = self.config, header.meta_len, header.body_len
        if meta_len > c.max_meta:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"metadata of {meta_len} bytes; the limit is {c.max_meta}")
        if HEADER_SIZE + meta_len + body_len > c.max_frame:
            size = HEADER_SIZE + meta_len + body_len
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes; the limit is {c.max_frame}")

    def _error(self, conn: Session, request_id: int, exc: ProtocolError) -> Reply:
        self.stats.errors += 1
        if exc.code in (ErrorCode.INVALID_OBJECT, ErrorCode.NO_SPACE, ErrorCode.BUSY):
            log.debug("%s: %s", conn.peer, exc)
        else:
            self._burst.warning(exc.code.name, "%s: %s%s", conn.peer, exc, " (closing)" if exc.closes else "")
        return Reply(Op.ERROR, encode_meta(ErrorReply(exc.code, exc.message)), close=exc.closes)

    async def _send(self, conn: Session, request_id: int, reply: Reply) -> None:
        body_len = sum(view.nbytes for view in reply.body)
        await conn.stream.sendall(pack_header(reply.op, request_id, len(reply.meta), body_len) + reply.meta)
        for view in reply.body:
            await conn.stream.sendall(view)
        self.stats.bytes_out += HEADER_SIZE + len(reply.meta) + body_len


async def _recv_exactly(conn: Session, view: memoryview, done: int, total: int) -> None:
    """Fill `view` (the bytes after `done` of `total` in a frame); ProtocolError if the client closes first."""
    got = 0
    while got < len(view):
        n = await conn.stream.recv_into(view[got:])
        if n == 0:
            raise ProtocolError(
                ErrorCode.BAD_FRAME, f"connection closed mid-frame, after {done + got} of {total} bytes"
            )
        got += n


def _error_frame(request_id: int, code: ErrorCode, message: str) -> bytes:
    meta = encode_meta(ErrorReply(code, message))
    return pack_header(Op.ERROR, request_id, len(meta), 0) + meta


class ServerThread:
    """A KVServer on its own event loop in a daemon thread (tests, benchmarks, embedding)."""

    def __init__(self, config: ServerConfig, cache: ObjectCache | None = None) -> None:
        self.config = config
        self._cache = cache
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: KVServer | None = None
        self._thread = threading.Thread(target=self._run, name="kvtier-server", daemon=True)

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start the thread and wait until the server listens."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("kvtier server did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.address

    @property
    def url(self) -> str:
        """kvtier://host:port, or kvtiers:// with TLS (without the token)."""
        host, port = self.address
        scheme = "kvtiers" if self.config.tls_cert else "kvtier"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = KVServer(self.config, self._cache)
            self._loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_until_complete(self.server.wait_stopped())
        self._loop.close()

    def stop(self, grace: float = 5.0) -> None:
        """Shut the server down gracefully and join the thread."""
        if self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self._loop).result()
        self._thread.join()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
