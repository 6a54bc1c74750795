"""The kvtier server's settings: one frozen dataclass, a unit and a comment per field, validated."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.server.protocol import DEFAULT_PORT, HEADER_SIZE
from kvtier.storage.policy import POLICIES
from kvtier.units import GiB, MiB


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the server listens, what it stores, and the limits it enforces on clients."""

    host: str = "127.0.0.1"  # interface to bind; loopback unless told otherwise
    port: int = DEFAULT_PORT  # TCP port; 0 picks a free one (tests)
    memory: int = 4 * GiB  # bytes of objects held in memory; 0 = disk only
    disk_path: str | None = None  # directory of the write-through disk tier; None = memory only
    disk_size: int = 64 * GiB  # bytes of objects on disk (with disk_path)
    policy: str = "lru"  # eviction policy of both tiers (lru, lfu, fifo, mru)
    fsync: bool = False  # fsync each disk object before acknowledging it
    token: str = field(default="", repr=False)  # shared secret clients send in HELLO; "" = no auth
    max_frame: int = 64 * MiB  # bytes: largest request frame (header + metadata + body) accepted
    max_meta: int = 1 * MiB  # bytes: largest request metadata accepted
    max_keys: int = 4096  # keys in one GET or EXISTS
    max_connections: int = 1024  # logged-in connections; beyond, fairness (admission.py) or BUSY
    max_pending: int = 256  # connections not logged in yet, beside max_connections; the oldest goes first
    max_pending_per_address: int = 32  # of those, from one client address; its oldest goes first
    login_timeout: float = 5.0  # seconds from connect to a successful HELLO (no token: to the first frame)
    max_inflight_bytes: int = 256 * MiB  # bytes of request bodies being received and handled at once
    inflight_wait: float = 2.0  # seconds an upload waits for room in max_inflight_bytes before BUSY
    idle_timeout: float = 600.0  # seconds a connection may wait between frames before it is closed
    io_timeout: float = 30.0  # seconds to receive one whole frame once it started, or to send a reply
    min_rate: int = 4 * MiB  # bytes/s: a frame taking longer than 1 s + size / min_rate is cut (TIMEOUT)
    name: str = "kvtier server"  # what logs and the bind rule call it ("P2P port" for a peer server)
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (kvtiers://); None = plain TCP
    tls_key: str | None = None  # PEM private key of tls_cert; None = in the cert file
    workers: int = 8  # threads for hashing and disk I/O
    socket_buffer: int = 0  # bytes of SO_SNDBUF/SO_RCVBUF; 0 = kernel autotuning (measured faster than 4 MiB)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.memory < 0 or self.disk_size < 0:
            raise ValueError("memory and disk_size must be non-negative")
        if self.memory == 0 and not self.disk_path:
            raise ValueError("memory is 0 and there is no disk_path: the server could store nothing")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_frame <= HEADER_SIZE or self.max_meta < 1 or self.max_meta > self.max_frame:
            raise ValueError(f"need {HEADER_SIZE} < max_frame and 1 <= max_meta <= max_frame")
        for name in ("max_keys", "max_connections", "max_pending", "max_pending_per_address", "workers", "min_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("idle_timeout", "io_timeout", "login_timeout", "inflight_wait"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_inflight_bytes < self.max_frame:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_frame ({self.max_frame}), "
                "or the largest request could never be received"
            )
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key given without tls_cert")
        if self.socket_buffer < 0:
            raise ValueError(f"socket_buffer must be non-negative, got {self.socket_buffer}")
