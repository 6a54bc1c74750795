"""Who gets a connection, and how much request memory each may hold: the server's admission control.

Connections. A new connection is *pending* until it logs in: a successful HELLO, or, on a server
without a token, its first frame (at most LOGIN_META bytes of metadata before that). Pending
connections live in their own small pool beside the main limit (`max_pending`), at most
`max_pending_per_address` from one client address (IPv6: one /64), and each has `login_timeout`
seconds to log in. When an address's share is full its own oldest pending connection is closed;
when the pool is full, the oldest of the address holding the most. Sockets that never speak thus
cannot lock anyone out: a client from an address with few pending connections that logs in
promptly gets through. A connection that logs in joins the main pool
(`max_connections`); when that is full, an idle connection of the address holding the most
connections makes room for an address holding fewer, so no address can crowd out the others.

Bytes in flight. A request's metadata and body are received into memory, where they stay until the
request is handled (a PUT's body becomes the stored object). Frames larger than UNRESERVED bytes
being received or handled together hold at most `max_inflight_bytes`, reserved by their declared
size before the first byte after the header is received; smaller ones are part of the fixed
overhead (UNRESERVED per connection). An
upload that does not fit waits up to `inflight_wait` seconds, then gets BUSY. While it waits, the
address holding the most bytes in flight, if it holds more than the waiter's address would with the
new upload, loses its largest upload still being received (BUSY, connection closed): a few clients
sending slowly cannot hold the whole reservation. With the rate floor of `min_rate` (server.py),
no upload holds memory for long.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import itertools
import socket
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.server.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from kvtier.server.config import ServerConfig
    from kvtier.server.handlers import ServerStats
    from kvtier.server.stream import Stream


class Phase(enum.Enum):
    IDLE = "idle"  # waiting for the first byte of a frame (idle or login timeout applies)
    RECEIVING = "receiving"  # inside a frame, or the TLS handshake (rate deadline applies)
    HANDLING = "handling"  # our own work, or waiting for room in flight: no client deadline
    SENDING = "sending"  # writing a reply (rate deadline applies)


@dataclass(eq=False, slots=True)
class Session:
    """One client connection, as the server sees it, and where it is in its current request."""

    stream: Stream
    host: str  # the client's address group (IPv4 address, IPv6 /64): per-address limits apply to it
    peer: str  # host:port, for logs
    login_deadline: float  # loop time by which it must log in
    authenticated: bool = False  # sent the right token (or the server has none)
    admitted: bool = False  # logged in: counted in the main pool
    phase: Phase = Phase.IDLE
    deadline: float = float("inf")  # loop time by which the current phase must end
    task: asyncio.Task[None] | None = None
    closing: bool = False  # the server cancelled the task
    cancel_code: ErrorCode | None = None  # the last error reply to send then (None: close quietly)

    def enter(self, phase: Phase, deadline: float) -> None:
        self.phase, self.deadline = phase, deadline if self.admitted else min(deadline, self.login_deadline)

    def cancel(self, code: ErrorCode | None) -> None:
        """Stop serving this connection; `code` is sent as a last error reply when not None."""
        if self.task is not None and not self.task.done() and not self.closing:
            self.closing, self.cancel_code = True, code
            self.task.cancel()


LOGIN_META = 4096  # bytes of metadata a connection may send before it logged in (a HELLO: token, name)
UNRESERVED = 64 * 1024  # frames up to this (metadata + body) are not reserved in flight: per connection


def host_of(addr: object) -> tuple[str, str]:
    """(address group, "host:port") of an accepted socket's address. Per-address limits apply to the
    group: an IPv4 address, or an IPv6 /64 (what one host or site typically holds)."""
    if not (isinstance(addr, tuple) and len(addr) >= 2):
        return str(addr), str(addr)
    host, peer = str(addr[0]), f"{addr[0]}:{addr[1]}"
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host, peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped), peer
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)), peer
    return str(ip), peer


class Connections:
    """The pending pool and the main pool, with their per-address counts."""

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.config = config
        self.stats = stats
        self.pending: dict[Session, None] = {}  # insertion order: oldest first
        self._pending_per_host: Counter[str] = Counter()
        self.main: set[Session] = set()
        self._per_host: Counter[str] = Counter()  # main-pool connections per address

    def all(self) -> list[Session]:
        return [*self.pending, *self.main]

    def add_pending(self, conn: Session) -> None:
        """Take a new connection in. If its address has its share of the pending pool, its own oldest
        pending connection is closed; if the pool is full, the oldest of the address holding most."""
        if self._pending_per_host[conn.host] >= self.config.max_pending_per_address:
            self._drop_oldest(conn.host)
        elif len(self.pending) >= self.config.max_pending:
            self._drop_oldest(self._pending_per_host.most_common(1)[0][0])
        self.pending[conn] = None
        self._pending_per_host[conn.host] += 1

    def _drop_oldest(self, host: str) -> None:
        victim = next(c for c in self.pending if c.host == host)
        self._forget_pending(victim)
        self.stats.pending_dropped += 1
        victim.cancel(None)

    def _forget_pending(self, conn: Session) -> None:
        if self.pending.pop(conn, False) is None:  # it was there
            _discount(self._pending_per_host, conn.host, 1)

    def admit(self, conn: Session) -> bool:
        """Move a connection that just logged in to the main pool; False if it must get BUSY (it then
        stays pending, tracked, until it is closed)."""
        if conn.admitted:
            return True
        if len(self.main) >= self.config.max_connections and not self._make_room(conn.host):
            self.stats.connections_refused += 1
            return False
        self._forget_pending(conn)
        conn.admitted = True
        self.main.add(conn)
        self._per_host[conn.host] += 1
        return True

    def _make_room(self, host: str) -> bool:
        """Close an idle connection of the address holding the most, if it holds more than `host` would."""
        top, most = self._per_host.most_common(1)[0]
        if most <= self._per_host[host] + 1:
            return False
        victim = next((c for c in self.main if c.host == top and c.phase is Phase.IDLE), None)
        if victim is None:
            return False
        self.remove(victim)
        self.stats.connections_evicted += 1
        victim.cancel(None)
        return True

    def remove(self, conn: Session) -> None:
        """Forget a connection (idempotent)."""
        self._forget_pending(conn)
        if conn in self.main:
            self.main.discard(conn)
            _discount(self._per_host, conn.host, 1)


@dataclass(eq=False, slots=True)
class _Waiter:
    conn: Session
    size: int
    future: asyncio.Future[None]
    order: int  # arrival, to break ties


class InflightBytes:
    """The reservation of request bodies in memory, shared fairly among client addresses.

    Room goes to waiting uploads in max-min order: first to the one whose address would hold the
    least with it (ties: the earliest), and no upload overtakes a waiting one ahead of it in that
    order. Small uploads from quiet addresses go first; a large upload from a busy address may see
    BUSY after `inflight_wait` while smaller ones keep arriving.
    """

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.limit = config.max_inflight_bytes
        self.wait = config.inflight_wait
        self.stats = stats
        self.used = 0
        self._held: dict[Session, int] = {}
        self._per_host: Counter[str] = Counter()
        self._freeing: dict[Session, int] = {}  # preempted uploads whose room is on its way back
        self._waiters: list[_Waiter] = []
        self._order = itertools.count()

    async def acquire(self, conn: Session, size: int) -> None:
        """Reserve `size` bytes for `conn`'s body; ProtocolError(BUSY) if no room within `wait` s."""
        waiter = _Waiter(conn, size, asyncio.get_running_loop().create_future(), next(self._order))
        self._waiters.append(waiter)
        self._grant()
        try:
            if not waiter.future.done():
                self._preempt(waiter)
                await asyncio.wait({waiter.future}, timeout=self.wait)
        finally:
            if not waiter.future.done():  # timed out, or the connection was cancelled meanwhile
                self._waiters.remove(waiter)
                waiter.future.cancel()
        if waiter.future.cancelled():
            self.stats.uploads_refused += 1
            raise ProtocolError(ErrorCode.BUSY, f"{self.used} of {self.limit} bytes in flight; no room for {size} more")

    def release(self, conn: Session) -> None:
        """Give back `conn`'s reservation (idempotent) and hand the room to waiting uploads."""
        size = self._held.pop(conn, 0)
        self._freeing.pop(conn, None)
        if not size:
            return
        self.used -= size
        _discount(self._per_host, conn.host, size)
        self._grant()

    def _grant(self) -> None:
        """Reserve room for waiting uploads in max-min order, stopping at the first that does not fit."""
        self._waiters.sort(key=lambda w: (self._per_host[w.conn.host] + w.size, w.order))
        while self._waiters and self.used + self._waiters[0].size <= self.limit:
            waiter = self._waiters.pop(0)
            self.used += waiter.size
            self._held[waiter.conn] = waiter.size
            self._per_host[waiter.conn.host] += waiter.size
            waiter.future.set_result(None)

    def _preempt(self, waiter: _Waiter) -> None:
        """Cut uploads still being received by the address holding the most, largest first, while it
        holds more than the waiter's address would with the waiter, until the waiter's room is coming."""
        need = waiter.size - (self.limit - self.used) - sum(self._freeing.values())
        mine = self._per_host[waiter.conn.host] + waiter.size
        holding = Counter(self._per_host)  # what each address holds once the room on its way is back
        for conn, size in self._freeing.items():
            holding[conn.host] -= size
        while need > 0:
            top, most = holding.most_common(1)[0] if holding else ("", 0)
            if top == waiter.conn.host or most <= mine:
                return
            receiving = [(n, c) for c, n in self._held.items()
                         if c.host == top and c.phase is Phase.RECEIVING and c not in self._freeing]  # fmt: skip
            if not receiving:
                return
            size, victim = max(receiving, key=lambda item: item[0])
            self._freeing[victim] = size
            holding[top] -= size
            need -= size
            self.stats.uploads_preempted += 1
            victim.cancel(ErrorCode.BUSY)


def _discount(counter: Counter[str], key: str, n: int) -> None:
    """Take `n` off `key`'s count, forgetting the key at zero (most_common then lists only holders)."""
    counter[key] -= n
    if not counter[key]:
        del counter[key]


def configure_socket(sock: socket.socket, buffer: int) -> None:
    """Non-blocking, no Nagle delay, and the configured socket buffers (0: the kernel's autotuning)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
