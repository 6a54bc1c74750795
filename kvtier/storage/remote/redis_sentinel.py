"""A Redis (or Valkey) master found through Sentinel, via redis-py's Sentinel: the RedisStore with failover.

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]
    rediss+sentinel:// (TLS to sentinels and servers)   valkey+sentinel://...   valkeys+sentinel://...

The hosts are sentinels (port 26379 unless given); the credentials are the master's, and sentinels
are asked without any. Each new connection asks the sentinels for the current master. After the
master dies, calls fail (misses) until the sentinels promote a replica; the tier's breaker retries
with back-off, and the next connection reaches the new master. A connection that finds its server
demoted to a replica is dropped (redis-py turns READONLY into a connection error), so writes move too.
Round trips are those of one server: a lookup is one pipeline, a get one MGET.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import SplitResult

from redis.sentinel import MasterNotFoundError, Sentinel

from kvtier.errors import ConfigError
from kvtier.storage.remote.redis import PACKER, RedisStore, hosts_text, split_hosts
from kvtier.storage.remote.store import StoreOptions

T = TypeVar("T")


class RedisSentinelStore(RedisStore):
    """Framed objects in the master that Sentinel names; every call is bounded by its deadline."""

    threaded = True  # a new connection asks the sentinels in turn, each within a socket timeout

    def __init__(self, url: SplitResult, options: StoreOptions) -> None:
        self._sentinels, self._auth = split_hosts(url, 26379)
        self._service, self._db = _service_and_db(url)
        super().__init__(url, options)

    def _where(self, url: SplitResult) -> str:
        return f"{self.scheme}://{hosts_text(self._sentinels)}/{self._service}/{self._db}"

    def _connect(self, timeout: float) -> Any:
        options = self.client_options(timeout)
        ssl: dict[str, Any] = {"ssl": True} if self.tls else {}  # Any: typeshed checks ** against each parameter
        # sentinels get the timeouts and TLS settings, not the credentials (those are the servers')
        tls_options = {name: value for name, value in self._auth.items() if name.startswith("ssl_")}
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"}
        sentinel = Sentinel(self._sentinels, sentinel_kwargs={**sentinel_options, **tls_options, **ssl})
        return sentinel.master_for(
            self._service, db=self._db, max_connections=self._options.max_connections, command_packer=PACKER,
            **options, **self._auth, **ssl,
        )  # fmt: skip

    def _run(self, timeout: float, fn: Callable[[], T]) -> T:
        try:
            return super()._run(timeout, fn)
        except MasterNotFoundError as exc:  # its message holds each sentinel client's repr: kilobytes
            unreachable = str(exc).count(" - ")  # one "<client> - <error>" per sentinel that failed
            detail = f" ({unreachable} of {len(self._sentinels)} unreachable)" if unreachable else ""
            raise MasterNotFoundError(f"the sentinels name no master for {self._service!r}{detail}") from None


def _service_and_db(url: SplitResult) -> tuple[str, int]:
    service, _, db = url.path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ConfigError(
            f"remote.url: {url.geturl()!r}: expected redis+sentinel://host:port[,host:port...]/service_name[/db]"
        )
    return service, int(db or 0)


def open_store(url: SplitResult, options: StoreOptions) -> RedisSentinelStore:
    """Factory registered for redis+sentinel://, rediss+sentinel://, valkey+sentinel:// and valkeys+sentinel://."""
    return RedisSentinelStore(url, options)
