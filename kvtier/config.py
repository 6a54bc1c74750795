"""Config: one frozen dataclass tree, validated on construction.

`Config.load()` reads, in increasing precedence: defaults, an upstream LMCache YAML file
(`LMCACHE_CONFIG_FILE`), `LMCACHE_*` variables, a kvtier YAML file (`KVTIER_CONFIG`) and `KVTIER_*`
variables. This module owns the fields and their validation; `config_load.py`, below it, reads
sources into any such dataclass tree and knows nothing of these fields but their metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtier import config_load
from kvtier.codec.spec import parse_spec
from kvtier.errors import ConfigError, closest
from kvtier.tls import ClientTLS
from kvtier.units import GiB
from kvtier.urls import parse_url

HASHES = ("blake3", "sha256", "xxh128")
POLICIES = ("lru", "lfu", "fifo", "mru")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _size(default: int, doc: str) -> Any:
    return field(default=default, metadata={"kind": "size", "doc": doc})


def _opt(kind: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"kind": kind, "doc": doc})


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}{closest(str(value), choices)}")


@dataclass(frozen=True, slots=True)
class L1Config:
    """The CPU memory tier."""

    size: int = _size(4 * GiB, "bytes of KV held in CPU memory; 0 disables the tier")
    policy: str = _opt("choice", "lru", "eviction policy: lru, lfu, fifo or mru")

    def __post_init__(self) -> None:
        _check_choice("l1.policy", self.policy, POLICIES)


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """The local disk tier; it survives restarts."""

    path: str | None = _opt("optstr", None, "directory of the disk tier; unset disables it")
    size: int = _size(16 * GiB, "bytes of KV kept on disk before eviction")
    policy: str = _opt("choice", "lru", "eviction policy: lru, lfu, fifo or mru")
    fsync: bool = _opt("bool", False, "fsync each object before it becomes visible (slower)")

    def __post_init__(self) -> None:
        _check_choice("disk.policy", self.policy, POLICIES)
        if self.path is not None and not self.path.strip():
            raise ConfigError("disk.path: empty path; leave it unset to disable the disk tier")


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """The remote (L3) tier, selected by URL (redis://, redis+cluster://, redis+sentinel://, s3://, fs://, kvtier://)."""

    url: str | None = _opt("optstr", None, "remote tier URL; unset disables it")
    codec: str = _opt("choice", "raw", "codec spec of objects written to the remote tier (see `codec`)")
    lookup_timeout_ms: int = _opt("int", 50, "deadline of a remote lookup (one batched exists), milliseconds")
    timeout_ms: int = _opt("int", 2000, "deadline of one remote get, put or delete, milliseconds")
    connect_timeout_ms: int = _opt("int", 500, "deadline to open a connection, milliseconds")
    max_connections: int = _opt("int", 8, "connections (or concurrent requests) to the remote")
    max_object: int = _size(1 << 30, "largest object a get accepts; a larger one is a miss, never allocated")
    backoff_ms: int = _opt("int", 250, "pause after a failure before the remote is tried again, milliseconds")
    backoff_max_ms: int = _opt("int", 10_000, "the pause doubles per failure up to this, milliseconds")

    def __post_init__(self) -> None:
        parse_spec(self.codec, "remote.codec")
        names = ("lookup_timeout_ms", "timeout_ms", "connect_timeout_ms", "max_connections", "backoff_ms", "max_object")
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"remote.{name}: {getattr(self, name)} must be at least 1")
        if self.backoff_max_ms < self.backoff_ms:
            raise ConfigError(f"remote.backoff_max_ms: {self.backoff_max_ms} is below backoff_ms {self.backoff_ms}")
        if self.url is not None:
            parse_url(self.url)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Membership in a cluster: the controller this instance reports its chunks to."""

    controller_url: str | None = _opt("optstr", None, "controller URL, e.g. http://127.0.0.1:9000; unset = standalone")
    instance_id: str = _opt("str", "", "this instance's name, unique in the cluster and the same after a restart")
    advertise: str = _opt("str", "", "host:port where this instance serves its chunks to peers; empty = none")
    heartbeat_ms: int = _opt("int", 1000, "interval between heartbeats, milliseconds")
    flush_ms: int = _opt("int", 100, "longest delay of a KV event before it is sent, milliseconds")
    timeout_ms: int = _opt("int", 2000, "deadline of one request to the controller, milliseconds")
    max_events: int = _opt("int", 1_000_000, "events buffered while the controller is away; beyond, resync")
    peer_fetch: bool = _opt("bool", False, "fetch chunks missing locally from the peer the controller names")
    peer_lookup_timeout_ms: int = _opt("int", 50, "deadline of the controller lookup before a peer fetch, ms")
    peer_timeout_ms: int = _opt("int", 1000, "deadline of one fetch from a peer (a batch of chunks), ms")

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_ms",
            "flush_ms",
            "timeout_ms",
            "max_events",
            "peer_lookup_timeout_ms",
            "peer_timeout_ms",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name}: {getattr(self, name)} must be at least 1")
        if self.controller_url is not None:
            if not self.controller_url.startswith(("http://", "https://")):
                raise ConfigError(f"cluster.controller_url: {self.controller_url!r} is not an http(s):// URL")
            if not self.instance_id.strip():
                raise ConfigError("cluster.instance_id: required with a controller_url (stable across restarts)")
        elif self.peer_fetch:
            raise ConfigError("cluster.peer_fetch: needs a controller_url (the controller says which peer has what)")
        if self.advertise and not self.advertise.rpartition(":")[2].isdigit():
            raise ConfigError(f"cluster.advertise: {self.advertise!r} is not host:port")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The instance's admin HTTP API (health, config, stats, clear) and Prometheus /metrics."""

    port: int = _opt("int", 0, "TCP port of the admin API; 0 = off (convention: 9100 + rank)")
    host: str = _opt("str", "127.0.0.1", "interface the admin API binds; loopback unless told otherwise")
    advertise: str = _opt("str", "", "host the controller reaches the admin API at; empty = admin.host")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"admin.port: {self.port} is not in [0, 65535]")
        if any(c in self.advertise for c in "/@?# ") or self.advertise.count(":") == 1:
            raise ConfigError(f"admin.advertise: {self.advertise!r} is not a host name or address (no scheme or port)")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS of this instance's servers (admin API, P2P port) and of what it connects to (controller,
    peers, kvtiers:// servers). docs/security.md says when to use it."""

    cert: str | None = _opt("optstr", None, "PEM certificate chain the admin API and P2P port present; unset = no TLS")
    key: str | None = _opt("optstr", None, "PEM private key of tls.cert; unset = in the cert file")
    ca: str | None = _opt("optstr", None, "PEM CA bundle trusted for servers kvtier connects to; unset = the system's")
    verify: bool = _opt("bool", True, "verify the certificate and host name of servers kvtier connects to")

    def __post_init__(self) -> None:
        if self.key and not self.cert:
            raise ConfigError("tls.key: given without tls.cert")

    def client(self) -> ClientTLS:
        """How this instance checks the servers it connects to."""
        return ClientTLS(self.ca, self.verify)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a CacheEngine needs to know besides the model and its KV layout."""

    chunk_size: int = _opt("int", 256, "tokens per chunk (a multiple of the engine's block size)")
    hash: str = _opt("choice", "blake3", "chunk hash: blake3, sha256 or xxh128")
    save_partial_chunks: bool = _opt("bool", True, "also store a trailing chunk shorter than chunk_size")
    codec: str = _opt("choice", "raw", "codec of disk objects: raw, fp8, fp8-e5m2, kivi-2, kivi-4, cachegen[:opt=v,..]")
    tenant: str = _opt("str", "", "salt mixed into every key; tenants never share KV")
    write_queue: int = _opt("int", 256, "pending lower-tier writes (chunks) before the oldest is dropped")
    log_level: str = _opt("choice", "warning", "logging level of the kvtier logger")
    l1: L1Config = field(default_factory=L1Config)
    disk: DiskConfig = field(default_factory=DiskConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= 1 << 20:
            raise ConfigError(f"chunk_size: {self.chunk_size} is not between 1 and 1048576 tokens")
        _check_choice("hash", self.hash, HASHES)
        parse_spec(self.codec, "codec")
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        if self.write_queue < 1:
            raise ConfigError(f"write_queue: {self.write_queue} must be at least 1")

    @classmethod
    def load(cls, path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
        """Build a Config from YAML files and environment variables (see module docstring)."""
        return config_load.load(cls, path, env)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dict") -> Config:
        """Build a Config from a nested mapping like the YAML file; unknown keys are errors."""
        return config_load.build(cls, [(source, False, config_load.flatten(cls, data, source))])

    def merged(self, overrides: Mapping[str, Any], source: str = "overrides") -> Config:
        """A copy with `overrides` (nested like the YAML file) applied and validated."""
        cls = type(self)
        base = config_load.flatten(cls, self.to_dict(), "base")
        return config_load.build(
            cls, [("base", False, base), (source, False, config_load.flatten(cls, overrides, source))]
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a nested dict, the shape of the YAML file."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        """Return a copy with top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
