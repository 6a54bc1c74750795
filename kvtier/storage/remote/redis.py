"""Redis and Valkey (same protocol) through redis-py: pipelined EXISTS, MGET, SET, DEL.

    redis://[[user]:password@]host:port/db   rediss://... (TLS)   valkey://...   valkeys://...

redis-py sets timeouts per client, not per call, so the store keeps one client (and connection pool)
per deadline it is asked for: in practice two, a short one for lookups and one for data.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult

import redis
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from kvtier.keys import ChunkKey
from kvtier.storage.remote.store import Buffer, StoreOptions, object_name

_TLS = {"rediss", "valkeys"}
# redis-py packs commands with hiredis when it is installed, which copies a 5.9 MB value into the
# command at ~0.4 GB/s; its Python packer sends values over 6 kB as they are. (hiredis still parses.)
PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


class RedisStore:
    """Framed objects as Redis string values named "kvtier/<namespace>/<digest>"."""

    def __init__(self, url: SplitResult, options: StoreOptions) -> None:
        self.scheme = url.scheme.lower()
        plain = url._replace(scheme="rediss" if self.scheme in _TLS else "redis")
        self._url = plain.geturl()
        self.where = f"{self.scheme}://{url.hostname}:{url.port or 6379}{url.path or ''}"
        self._options = options
        self._clients: dict[float, redis.Redis] = {}
        self._lock = threading.Lock()

    def _client(self, timeout: float) -> redis.Redis:
        client = self._clients.get(timeout)
        if client is None:
            with self._lock:
                client = self._clients.get(timeout)
                if client is None:
                    client = redis.Redis.from_url(
                        self._url, socket_timeout=timeout, max_connections=self._options.max_connections,
                        socket_connect_timeout=min(timeout, self._options.connect_timeout),
                        retry=Retry(NoBackoff(), 0), health_check_interval=0,  # the breaker retries
                        command_packer=PACKER,
                    )  # fmt: skip
                    self._clients[timeout] = client
        return client

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        pipe = self._client(timeout).pipeline(transaction=False)
        for key in keys:
            pipe.exists(object_name(key))
        return [bool(n) for n in pipe.execute()]

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        values: list[Any] = self._client(timeout).mget([object_name(k) for k in keys])
        return values

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        self._client(timeout).set(object_name(key), b"".join(parts))

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        return bool(self._client(timeout).delete(object_name(key)))

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def open_store(url: SplitResult, options: StoreOptions) -> RedisStore:
    """Factory registered for redis://, rediss://, valkey:// and valkeys://."""
    return RedisStore(url, options)
