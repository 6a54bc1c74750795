"""Redis Cluster (or Valkey's) through redis-py's RedisCluster: the RedisStore spread over many masters.

    redis+cluster://[[user]:password@]host:port[,host:port...]   rediss+cluster:// (TLS)
    valkey+cluster://...   valkeys+cluster://...

The hosts are seeds: the client reads the slot map from the first that answers, follows MOVED and
ASK, and reads the map again after a node fails. Making a client (on the first call with a given
deadline) also reads the command table: a few round trips, and a 90 kB reply. If that outlasts the
call's deadline the call misses, and the client, finished in the background, serves the next.
Round trips of one call, whose keys lie on N masters:
- exists (the longest-prefix lookup): one pipeline of EXISTS, split by node. redis-py writes every
  node's share before it reads any answer, so the nodes work at once: one round trip of wall time.
- get: one MGET per hash slot (mget_nonatomic), sent as one pipeline the same way.
- put, delete: one command to the key's master.

Keys have no hash tag: a slot is hashed from the whole "kvtier/<namespace>/<digest>", so a prompt's
chunks spread over all masters, and so do load and memory. A tag on the namespace would put a model's
(or tenant's) every chunk on one node; a tag per prompt is impossible, as a chunk's key depends only
on the tokens up to it, which every prompt with that prefix shares. Spreading costs a lookup one
socket per node instead of one, within the same round trip.

A call that touches a master that is down fails as a whole (redis-py's pipeline gives no partial
answer), so the tier misses and pauses; calls whose keys avoid that master still hit. A cluster with
replicas fails over by itself; without them, set `cluster-require-full-coverage no` on the servers,
or the other masters refuse every key once the dead one is marked failed (cluster-node-timeout).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult

import redis
from redis.cluster import ClusterNode, RedisCluster

from kvtier.errors import ConfigError
from kvtier.storage.remote.redis import PACKER, RedisStore, hosts_text, split_hosts
from kvtier.storage.remote.store import StoreOptions


class PackedConnection(redis.Connection):
    """A node connection with kvtier's command packer (RedisCluster has no option for it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=PACKER, **kwargs)


class PackedSSLConnection(redis.SSLConnection):
    """The TLS form of PackedConnection."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(command_packer=PACKER, **kwargs)


class RedisClusterStore(RedisStore):
    """Framed objects as string values in a Redis Cluster; every call is bounded by its deadline."""

    # redis-py re-sends a timed-out pipeline's commands one by one, refreshing the slot map after each
    threaded = True

    def __init__(self, url: SplitResult, options: StoreOptions) -> None:
        self._seeds, self._auth = split_hosts(url, 6379)
        if url.path not in ("", "/", "/0"):
            raise ConfigError(f"remote.url: {url.geturl()!r}: a Redis Cluster has only database 0")
        super().__init__(url, options)

    def _where(self, url: SplitResult) -> str:
        return f"{self.scheme}://{hosts_text(self._seeds)}"

    def _connect(self, timeout: float) -> RedisCluster:
        (host, port), *more = self._seeds
        options = self.client_options(timeout)
        # url= makes redis-py hand these options to each node's ConnectionPool as they are, which is
        # the only way to give the nodes a connection class (and so the packer); it asks the seeds now
        return RedisCluster(
            url=f"redis://{_bracket(host)}:{port}", startup_nodes=[ClusterNode(h, p) for h, p in more],
            retry=options.pop("retry"), require_full_coverage=False, max_connections=self._options.max_connections,
            connection_class=PackedSSLConnection if self.tls else PackedConnection, **options, **self._auth,
        )  # fmt: skip

    def _mget(self, client: Any, names: list[str]) -> list[Any]:
        result: list[Any] = client.mget_nonatomic(names)
        return result


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def open_store(url: SplitResult, options: StoreOptions) -> RedisClusterStore:
    """Factory registered for redis+cluster://, rediss+cluster://, valkey+cluster:// and valkeys+cluster://."""
    return RedisClusterStore(url, options)
