"""What each worker rank holds in memory, mirrored in the scheduler's process over a local socket.

A serving engine's scheduler decides how many tokens to load before any worker is asked, and it
often runs in another process than the workers (vLLM's EngineCore and its worker ranks), where it
cannot see their memory tier. Asking the workers on every scheduling step would put a process
round trip (or a deadline) on the scheduling path. Instead every worker rank publishes the keys its
L1 admits and evicts, and the scheduler keeps a mirror: a lookup is a set probe in the scheduler's
own memory.

- **Worker** (`HoldingsPublisher`): listens on an abstract Unix socket named after the serving
  engine's id and the rank (`\\0kvtier-holdings-<engine id>-<rank>`: no file to clean up, reachable
  from this machine's processes only). A scheduler that connects first gets a snapshot of every key
  L1 holds, then the tier's events (the cluster's 33-byte records, `cluster/events.py`) as they
  happen: the thread wakes on each event and sends what piled up, so a chunk stored in one step is
  visible to the scheduler well before the next step's scheduling. Events that overflow the buffer
  (the scheduler stopped reading) are replaced by a fresh snapshot.
- **Scheduler** (`HoldingsMirror`): connects to every rank in the background, retrying until it
  is closed, and keeps one key set per rank. `prefix(rank, keys)` counts the leading keys the rank
  holds. A rank it is not connected to holds nothing.

A stale answer is harmless by construction: a chunk the mirror still lists after its eviction is a
load that fails and is recomputed (the connector's failed-load path); a chunk not yet listed is a
recompute. Nothing is pinned, so no lease can leak.

Frames, both ways of one stream: `kind (u8) | length (u32 LE) | payload`. SNAPSHOT's payload is
32-byte keys (namespace + digest), replacing the rank's set; EVENTS' is event records, applied in
order. A frame over `MAX_FRAME` bytes, an unknown kind or a torn record closes the connection (the
scheduler reconnects and gets a snapshot).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence

from kvtier.cluster.events import KEY_BYTES, TIER_CODES, EventBatcher, decode_records, encode_keys
from kvtier.keys import ChunkKey
from kvtier.storage.cpu import CPUTier

log = logging.getLogger("kvtier.cluster.holdings")
SNAPSHOT, EVENTS = 1, 2
HEADER = struct.Struct("<BI")
MAX_FRAME = 256 << 20  # bytes: a snapshot of ~8M keys
_L1 = TIER_CODES["l1"]


def address(engine_id: str, rank: int) -> str:
    """The abstract socket name of rank `rank`'s publisher for one serving engine."""
    return f"\0kvtier-holdings-{engine_id}-{rank}"


class HoldingsPublisher:
    """Serves one rank's L1 keys and their changes to the scheduler (one connection at a time)."""

    def __init__(self, l1: CPUTier, name: str, max_events: int = 1_000_000) -> None:
        self.l1 = l1
        self.name = name
        self.batcher = EventBatcher(max_events)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(name)  # raises OSError if another process serves this name
        self._server.listen(4)
        self._server.settimeout(0.2)  # the accept loop checks for close() this often
        l1.listeners.append(self._record)
        self._thread = threading.Thread(target=self._run, name="kvtier-holdings", daemon=True)
        self._thread.start()

    def _record(self, tier: str, admitted: bool, key: ChunkKey) -> None:
        self.batcher.record(tier, admitted, key)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self._conn = conn
            try:
                self._serve(conn)
            except OSError as exc:
                log.info("holdings: the scheduler went away (%s); waiting for it to reconnect", exc)
            finally:
                conn.close()
                self._conn = None

    def _serve(self, conn: socket.socket) -> None:
        self._send_snapshot(conn)
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if select.select([conn], [], [], 0)[0] and not conn.recv(1):
                raise OSError("connection closed")  # the scheduler sends nothing: readable means gone
            if self.batcher.overflowed:
                self._send_snapshot(conn)
                continue
            batch = self.batcher.take()
            if batch is not None:
                conn.sendall(HEADER.pack(EVENTS, len(batch[1])) + batch[1])

    def _send_snapshot(self, conn: socket.socket) -> None:
        self.batcher.reset()  # every event after this goes out after the snapshot (see EventBatcher.reset)
        blob = encode_keys(self.l1.held_keys())
        conn.sendall(HEADER.pack(SNAPSHOT, len(blob)) + blob)

    def close(self) -> None:
        """Stop serving and stop listening to L1."""
        self._stop.set()
        self._wake.set()
        if self._record in self.l1.listeners:
            self.l1.listeners.remove(self._record)
        self._server.close()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


class HoldingsMirror:
    """The scheduler's copy of every rank's L1 keys, kept current by their publishers."""

    def __init__(self, names: Sequence[str], retry_s: float = 0.1) -> None:
        self.names = list(names)
        self._held: list[set[bytes]] = [set() for _ in names]
        self._connected = [False] * len(names)
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._socks: list[socket.socket | None] = [None] * len(names)
        self._threads = [
            threading.Thread(target=self._follow, args=(rank,), name=f"kvtier-mirror-{rank}", daemon=True)
            for rank in range(len(names))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def connected(self) -> list[bool]:
        """Per rank: whether its publisher is connected now."""
        return list(self._connected)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until every rank is connected (or `timeout` seconds passed); whether they are."""
        deadline = time.monotonic() + timeout
        while not all(self._connected) and time.monotonic() < deadline:
            time.sleep(0.01)
        return all(self._connected)

    def prefix(self, rank: int, keys: Sequence[ChunkKey]) -> int:
        """How many leading `keys` rank `rank` holds in L1 (as last heard)."""
        held = self._held[rank]
        for i, key in enumerate(keys):
            if key.namespace + key.digest not in held:
                return i
        return len(keys)

    def _follow(self, rank: int) -> None:
        """Connect to one rank's publisher, apply its frames; reconnect after any failure."""
        warned = False
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.names[rank])
            except OSError:
                sock.close()
                self._stop.wait(self._retry_s)
                continue
            self._socks[rank] = sock
            try:
                self._read(rank, sock)
            except ValueError as exc:  # a publisher that speaks something else
                if not warned:
                    log.warning("holdings of rank %d: %s; reconnecting", rank, exc)
                    warned = True
            except OSError as exc:  # the worker stopped (shutdown, or a crash vLLM reports itself)
                if not self._stop.is_set():
                    log.info("holdings of rank %d: %s; reconnecting", rank, exc)
            finally:
                self._connected[rank] = False
                self._held[rank] = set()
                self._socks[rank] = None
                sock.close()

    def _read(self, rank: int, sock: socket.socket) -> None:
        while not self._stop.is_set():
            kind, length = HEADER.unpack(_read_exactly(sock, HEADER.size))
            if length > MAX_FRAME:
                raise ValueError(f"a frame of {length} bytes (at most {MAX_FRAME})")
            payload = _read_exactly(sock, length)
            if kind == SNAPSHOT:
                if length % KEY_BYTES:
                    raise ValueError(f"a snapshot of {length} bytes is not whole keys")
                self._held[rank] = {payload[i : i + KEY_BYTES] for i in range(0, length, KEY_BYTES)}
                self._connected[rank] = True
            elif kind == EVENTS:
                held = self._held[rank]
                for tier, admitted, key in decode_records(payload):
                    if tier == _L1:
                        if admitted:
                            held.add(key)
                        else:
                            held.discard(key)
            else:
                raise ValueError(f"unknown frame kind {kind}")

    def close(self) -> None:
        """Stop following the publishers."""
        self._stop.set()
        for sock in list(self._socks):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise OSError("connection closed")
        got += k
    return bytes(buf)
