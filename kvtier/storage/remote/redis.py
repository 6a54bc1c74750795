"""Redis and Valkey (same protocol) through redis-py: pipelined EXISTS, MGET, SET, DEL.

    redis://[[user]:password@]host:port/db   rediss://... (TLS)   valkey://...   valkeys://...

RedisStore is also the base of the Cluster and Sentinel stores (redis_cluster.py, redis_sentinel.py),
which change only how a client is made, how MGET spans nodes and how a deadline is kept. Objects
have the same names in all three, so one deployment's objects read the same however it is reached.
redis-py sets timeouts per client, not per call, so a store keeps one client (and connection pool)
per deadline it is asked for: in practice two, a short one for lookups and one for data.

How a reply is bounded (`max_object`): redis-py reads a whole bulk reply before returning it, and
neither of its parsers (hiredis, Python) allocates a reply's declared length up front: the buffer
grows with the bytes that arrive (a server that declared a 4 GB value and sent 8 MiB cost the client
9 MiB). What a server holds under a key is bounded by the server: no string value exceeds its
proto-max-bulk-len (512 MB by default; SET, APPEND and SETRANGE past it are refused), so an operator
who wants a lower bound sets it there (1 MB at least, and above the largest object kvtier writes).
The values are objects kvtier wrote; RemoteTier checks each one's key, layout and checksum. A value
over `max_object` is then refused like on the other backends (a TierError), but after it was read.
No check runs before the read. A STRLEN in the MGET's pipeline is answered with the MGET, so it
bounds nothing, and it cost a batch of 8 values 1.3-1.5x (4 kB) and 1.6-1.7x (256 kB) on loopback;
a STRLEN round trip first doubles a get's round trips (2.0-2.3x at 4 kB), and a server that lied
about a value would lie about its length. GETRANGE key 0 max_object would have the server cut a
value short, at 8 commands for one MGET (1.3x at 4 kB), and bound only honest servers, which
proto-max-bulk-len already bounds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import SplitResult

import redis
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from kvtier.errors import ConfigError, TierError
from kvtier.keys import ChunkKey
from kvtier.storage.remote.deadline import DeadlinePool
from kvtier.storage.remote.store import Buffer, StoreOptions, object_name

T = TypeVar("T")
_TLS = {"rediss", "valkeys"}


class Parts(tuple[Buffer, ...]):
    """Buffers that go to the server back to back as one value, never joined in memory."""


class Packer(PythonRespSerializer):
    """redis-py's Python packer, plus values given as Parts (a header and a payload, say): the
    command carries their total length once and the socket sends each part as it is."""

    def pack(self, *args: Any) -> list[Any]:
        if not isinstance(args[-1], Parts):
            return super().pack(*args)
        *head, value = args
        packed = b"".join(super().pack(*head))  # the command and the key: small
        total = sum(memoryview(part).nbytes for part in value)
        first = b"*%d\r\n" % len(args) + packed[packed.index(b"\r\n") + 2 :] + b"$%d\r\n" % total
        return [first, *value, b"\r\n"]


# redis-py packs commands with hiredis when it is installed, which copies a 5.9 MB value into the
# command at ~0.4 GB/s; its Python packer sends values over 6 kB as they are. (hiredis still parses.)
PACKER = Packer(6000, Encoder("utf-8", "strict", False).encode)
# URL query options the multi-host schemes pass to redis-py (timeouts and pool size are remote.* settings)
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


class RedisStore:
    """Framed objects as Redis string values named "kvtier/<namespace>/<digest>"."""

    # run calls on worker threads (deadline.py): set where one call may wait for several socket timeouts
    threaded = False

    def __init__(self, url: SplitResult, options: StoreOptions) -> None:
        self.scheme = url.scheme.lower()
        self.where = self._where(url)
        self.tls = self.scheme.partition("+")[0] in _TLS
        self._url = url
        self._options = options
        self._clients: dict[float, Any] = {}
        self._lock = threading.Lock()
        self._deadlines = DeadlinePool(options.max_connections, f"kvtier-{self.scheme}") if self.threaded else None

    # --- what the Cluster and Sentinel stores change ---------------------------------------------

    def _where(self, url: SplitResult) -> str:
        """The store's location for logs, without credentials."""
        return f"{self.scheme}://{url.hostname}:{url.port or 6379}{url.path or ''}"

    def _connect(self, timeout: float) -> Any:
        """A new client whose calls time out after `timeout` seconds."""
        url = self._url._replace(scheme="rediss" if self.tls else "redis").geturl()
        return redis.Redis.from_url(url, max_connections=self._options.max_connections,
                                    command_packer=PACKER, **self.client_options(timeout))  # fmt: skip

    def _mget(self, client: Any, names: list[str]) -> list[Any]:
        result: list[Any] = client.mget(names)
        return result

    def _run(self, timeout: float, fn: Callable[[], T]) -> T:
        """Run one call within `timeout` (on one server its socket timeouts bound it)."""
        if self._deadlines is None:
            return fn()
        # the call that makes a client connects first: like one server's, it may add a connect timeout
        grace = 0.0 if timeout in self._clients else min(timeout, self._options.connect_timeout)
        return self._deadlines.run(timeout + grace, fn)

    # --- the ObjectStore protocol ----------------------------------------------------------------

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        def call() -> list[bool]:
            pipe = self._client(timeout).pipeline(transaction=False)
            for key in keys:
                pipe.exists(object_name(key))
            return [bool(n) for n in pipe.execute()]

        return self._run(timeout, call)

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        names = [object_name(k) for k in keys]
        values: list[Buffer | None] = self._run(timeout, lambda: self._mget(self._client(timeout), names))
        bound = self._options.max_object
        for name, value in zip(names, values, strict=True):
            if value is not None and len(value) > bound:  # read already: see the module docstring
                raise TierError(f"Redis value {name} is {len(value)} bytes, over remote max_object ({bound} bytes)")
        return values

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        value = Parts(memoryview(part).cast("B") for part in parts)
        self._run(timeout, lambda: self._client(timeout).set(object_name(key), value))

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        return self._run(timeout, lambda: bool(self._client(timeout).delete(object_name(key))))

    def close(self) -> None:
        if self._deadlines is not None:
            self._deadlines.close()
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    # --- internals -------------------------------------------------------------------------------

    def client_options(self, timeout: float) -> dict[str, Any]:
        """Timeouts of a client for `timeout`; redis-py's retries are off (the tier's breaker retries)."""
        return {
            "socket_timeout": timeout,
            "socket_connect_timeout": min(timeout, self._options.connect_timeout),
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }

    def _client(self, timeout: float) -> Any:
        client = self._clients.get(timeout)
        if client is None:
            # made outside the lock, as a cluster client connects to its seeds at once (a failure is
            # retried on the next call): two threads may race, and the loser's client is closed
            made = self._connect(timeout)
            with self._lock:
                client = self._clients.setdefault(timeout, made)
            if client is not made:
                made.close()
        return client


def split_hosts(url: SplitResult, default_port: int) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The hosts of a multi-host URL ("user:pw@h1:p1,h2:p2") and the redis-py options of its
    credentials and TLS query options. ConfigError names what is wrong."""
    userinfo, _, hostlist = url.netloc.rpartition("@")
    hosts = [_host_port(item, default_port, url) for item in hostlist.split(",")]
    unknown = [name for name in _query_names(url) if name not in TLS_OPTIONS]
    if unknown:
        raise ConfigError(
            f"remote.url: {url.scheme}:// does not take {', '.join(unknown)}; it takes {', '.join(TLS_OPTIONS)} "
            "(timeouts and pool size are remote.* settings)"
        )
    tls = url.scheme.partition("+")[0] in _TLS
    if url.query and not tls:
        raise ConfigError(f"remote.url: {url.geturl()!r}: TLS options need rediss+... or valkeys+...")
    single = f"{'rediss' if tls else 'redis'}://{userinfo}@x"
    options = redis.connection.parse_url(f"{single}?{url.query}" if url.query else single)
    for name in ("host", "connection_class"):  # the stores pick connection classes by their own TLS flag
        options.pop(name, None)
    return hosts, options


def _host_port(item: str, default_port: int, url: SplitResult) -> tuple[str, int]:
    host, port = item, ""
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host or (port and not port.isdigit()) or int(port or default_port) > 65535:
        raise ConfigError(f"remote.url: {url.geturl()!r}: {item!r} is not host:port")
    return host, int(port or default_port)


def _query_names(url: SplitResult) -> list[str]:
    return [pair.partition("=")[0] for pair in url.query.split("&") if pair]


def hosts_text(hosts: list[tuple[str, int]]) -> str:
    """The `where` of a store's hosts: "h1:p1,h2:p2" (IPv6 hosts in brackets)."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)


def open_store(url: SplitResult, options: StoreOptions) -> RedisStore:
    """Factory registered for redis://, rediss://, valkey:// and valkeys://."""
    return RedisStore(url, options)
