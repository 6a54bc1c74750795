"""Client connections to a kvtier server: framed requests over a blocking socket, and a small pool.

Every socket operation gets the time left until the caller's deadline as its timeout, so a call
never outlives its deadline by more than one system call. A connection that fails in any way
(timeout, reset, malformed reply) is closed by the pool and never reused half-read; one that
received a whole error reply is still in step and goes back to the pool.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import count

import msgspec
import numpy as np

from kvtier.errors import TierError
from kvtier.server.protocol import (
    HEADER_SIZE,
    REPLY_BIT,
    ErrorCode,
    ErrorReply,
    FrameHeader,
    Hello,
    HelloReply,
    Op,
    ProtocolError,
    ServerError,
    decode_meta,
    encode_meta,
    pack_header,
    unpack_header,
)

_REQUEST_IDS = 2**32
_MAX_REPLY_META = 16 << 20  # bytes: a reply's metadata (a GET of 4,096 keys needs ~40 KiB)
_WAITALL_MIN = 64 * 1024  # bodies at least this large are received with MSG_WAITALL
_WAITALL_SLICE = 0.25  # seconds one such receive may block
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


class PoolBusy(TimeoutError):
    """Every connection of the pool stayed lent out until the deadline: contention in this
    process, not a fault of the server."""


def time_left(deadline: float) -> float:
    """Seconds until `deadline` (time.monotonic); TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("kvtier server: deadline exceeded")
    return left


class Connection:
    """One authenticated socket to the server; not thread-safe (the pool lends it to one caller)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)  # no sendmsg, no MSG_WAITALL, no MSG_PEEK
        self.limits = HelloReply("", 0, False, 0, 0, 1)  # replaced by hello()
        self._ids = count(1)

    @classmethod
    def open(
        cls,
        address: tuple[str, int],
        token: str,
        connect_timeout: float,
        deadline: float,
        socket_buffer: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> Connection:
        """Connect, set socket options, shake hands over TLS if `tls`, and say HELLO (with the token)."""
        sock = socket.create_connection(address, timeout=min(connect_timeout, time_left(deadline)))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if socket_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)
            if tls is not None:
                sock.settimeout(min(connect_timeout, time_left(deadline)))
                sock = tls.wrap_socket(sock, server_hostname=address[0])  # verifies per the context
            conn = cls(sock)
            conn.hello(token, deadline)
        except BaseException:
            sock.close()
            raise
        return conn

    def hello(self, token: str, deadline: float) -> None:
        """Authenticate and learn the server's limits."""
        header, meta = self.request(Op.HELLO, Hello(token, "kvtier-client"), (), deadline)
        self.expect_no_body(header)
        self.limits = decode_meta(HelloReply, meta)

    def request(
        self, op: Op, meta: msgspec.Struct | None, body: Sequence[memoryview], deadline: float
    ) -> tuple[FrameHeader, bytearray]:
        """Send one request; the reply's header and metadata (its body is still to be read).

        ServerError for an error reply, ProtocolError for a reply that breaks the protocol.
        """
        request_id = next(self._ids) % _REQUEST_IDS
        meta_bytes = encode_meta(meta)
        body_len = sum(view.nbytes for view in body)
        self._send([memoryview(pack_header(op, request_id, len(meta_bytes), body_len) + meta_bytes), *body], deadline)
        head = bytearray(HEADER_SIZE)
        self.recv_into(memoryview(head), deadline)
        header = unpack_header(head)
        if header.request_id not in (request_id, 0):  # 0: the server could not tell which request failed
            raise ProtocolError(ErrorCode.BAD_FRAME, f"reply to request {header.request_id}, expected {request_id}")
        if header.meta_len > _MAX_REPLY_META:  # whatever limits the server announced
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"reply metadata of {header.meta_len} bytes")
        reply_meta = bytearray(header.meta_len)
        self.recv_into(memoryview(reply_meta), deadline)
        if header.op == Op.ERROR:
            self.expect_no_body(header)
            error = decode_meta(ErrorReply, reply_meta)
            raise ServerError(_error_code(error.code), error.message)
        if header.op != op | REPLY_BIT:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"reply opcode {header.op:#x} to a {op.name} request")
        return header, reply_meta

    def expect_no_body(self, header: FrameHeader) -> None:
        if header.body_len:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"unexpected reply body of {header.body_len} bytes")

    def read_body(self, size: int, deadline: float) -> memoryview:
        """`size` bytes of reply body, received straight into a new writable buffer."""
        body = np.empty(size, dtype=np.uint8).data  # not zero-filled: recv writes every byte once
        self.recv_into(body, deadline)
        return body

    def recv_into(self, view: memoryview, deadline: float) -> None:
        """Fill `view` from the socket."""
        if view.nbytes >= _WAITALL_MIN and not self.tls:
            self._recv_waitall(view, deadline)
            return
        sock, got, size = self.sock, 0, view.nbytes
        while got < size:
            sock.settimeout(time_left(deadline))
            n = sock.recv_into(view[got:])
            if not n:
                raise ConnectionError(f"kvtier server closed the connection after {got} of {size} bytes")
            got += n

    def _recv_waitall(self, view: memoryview, deadline: float) -> None:
        """Fill a large `view` with blocking MSG_WAITALL receives: usually one system call, where a
        socket timeout (poll, then whatever is buffered) takes dozens. SO_RCVTIMEO bounds each call by
        the deadline; a call it cuts short returns what it had, or raises EAGAIN if it had nothing."""
        sock, got, size = self.sock, 0, view.nbytes
        sock.settimeout(None)
        while got < size:
            # slices of at most 0.25 s: after a signal, CPython restarts the call with the same
            # SO_RCVTIMEO, so a whole deadline per call could be waited again after each signal
            left = min(time_left(deadline), _WAITALL_SLICE)
            seconds = int(left)
            micros = max(1, int((left - seconds) * 1e6))  # 0 would mean "no timeout"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(seconds, micros))
            try:
                n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            except BlockingIOError:
                continue  # this slice passed with nothing received: time_left() decides
            if not n:
                raise ConnectionError(f"kvtier server closed the connection after {got} of {size} bytes")
            got += n

    def _send(self, buffers: list[memoryview], deadline: float) -> None:
        sock = self.sock
        if self.tls:  # no sendmsg on an SSLSocket
            for view in buffers:
                sock.settimeout(time_left(deadline))
                sock.sendall(view)
            return
        while buffers:
            sock.settimeout(time_left(deadline))
            sent = sock.sendmsg(buffers)
            while buffers and sent >= buffers[0].nbytes:
                sent -= buffers.pop(0).nbytes
            if buffers and sent:
                buffers[0] = buffers[0][sent:]

    def idle_ok(self) -> bool:
        """Whether an idle connection is still usable: not closed by the server, nothing unexpected to read."""
        if self.tls:  # no MSG_PEEK: anything readable (bytes, a close) means it is not
            assert isinstance(self.sock, ssl.SSLSocket)
            try:
                poller = select.poll()  # not select(): file descriptors above 1024 are common in engines
                poller.register(self.sock, select.POLLIN)
                return not self.sock.pending() and not poller.poll(0)
            except (OSError, ValueError):
                return False
        try:
            self.sock.settimeout(0)
            self.sock.recv(1, socket.MSG_PEEK)  # b"": closed by the server; bytes: out of step
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def _error_code(code: int) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:  # a newer server's code: still an error, of a kind this client does not know
        return ErrorCode.INTERNAL


class Pool:
    """At most `size` connections, made by `connect(deadline)` on demand and reused LIFO."""

    def __init__(self, connect: Callable[[float], Connection], size: int, where: str) -> None:
        self._connect = connect
        self._size = size
        self._where = where
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self, deadline: float) -> Iterator[Connection]:
        """Borrow a connection until the block ends; it is closed if the block raises mid-exchange."""
        if self._closed:
            raise TierError(f"{self._where}: the store is closed")
        if not self._slots.acquire(timeout=time_left(deadline)):
            raise PoolBusy(f"{self._where}: all {self._size} connections stayed busy until the deadline")
        try:
            conn = self._take() or self._connect(deadline)
            try:
                yield conn
            except ServerError as exc:
                self._release(conn, keep=not exc.closes)  # a whole error reply was read: still in step
                raise
            except BaseException:
                conn.close()
                raise
            self._release(conn, keep=True)
        finally:
            self._slots.release()

    def _take(self) -> Connection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if conn.idle_ok():
                return conn
            conn.close()  # the server closed it (restart, idle timeout): make a new one

    def _release(self, conn: Connection, keep: bool) -> None:
        with self._lock:
            if keep and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close idle connections now and borrowed ones when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
