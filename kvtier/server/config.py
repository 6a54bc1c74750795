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
    max_connections: int = 1024  # open client connections; more are refused with BUSY
    max_inflight: int = 64  # request bodies received and processed at once (memory bound: x max_frame)
    idle_timeout: float = 600.0  # seconds a connection may wait between frames before it is closed
    io_timeout: float = 30.0  # seconds to receive one whole frame once it started, or to send a reply
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
        for name in ("max_keys", "max_connections", "max_inflight", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.idle_timeout <= 0 or self.io_timeout <= 0:
            raise ValueError("idle_timeout and io_timeout must be positive")
        if self.socket_buffer < 0:
            raise ValueError(f"socket_buffer must be non-negative, got {self.socket_buffer}")
