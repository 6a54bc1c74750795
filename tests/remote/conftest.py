"""Fixtures: one real server per kind for the session, and a RemoteTier over each with unique keys."""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from kvtier import CacheEngine
from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.storage.remote import open_store
from kvtier.storage.remote.store import ObjectStore, StoreOptions
from kvtier.storage.remote.tier import RemoteOptions, RemoteTier
from kvtier.urls import backend_of, parse_url
from tests.conftest import SMALL, random_kv
from tests.remote.redis_groups import RedisClusterGroup, RedisSentinelGroup
from tests.remote.servers import Server, ServerProcess, free_port, kvtier_server, redis_server, s3_server, s3_url

KINDS = ["redis", "redis+cluster", "redis+sentinel", "s3", "fs", "kvtier"]
# kind -> what starts it (fs needs no server)
STARTERS: dict[str, Callable[[], Server]] = {
    "redis": redis_server, "redis+cluster": RedisClusterGroup, "redis+sentinel": RedisSentinelGroup,
    "s3": s3_server, "kvtier": kvtier_server,
}  # fmt: skip
_namespaces = itertools.count(1000)


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(params=KINDS)
def remote_url(request, servers, tmp_path) -> str:
    """A URL of a running remote of each kind (servers are shared by the session)."""
    return url_of(request.param, servers, tmp_path)


def url_of(kind: str, servers: dict[str, Server], tmp_path) -> str:
    if kind == "fs":
        return f"fs://{tmp_path / 'shared'}"
    if kind not in servers:
        servers[kind] = STARTERS[kind]().start()
    return server_url(kind, servers[kind])


def server_url(kind: str, server: Server) -> str:
    """The URL of a started server of `kind`."""
    if isinstance(server, RedisClusterGroup | RedisSentinelGroup):
        return server.url
    assert isinstance(server, ServerProcess)
    if kind == "s3":
        return s3_url(server, prefix=f"t{next(_namespaces)}")
    return f"{kind}://127.0.0.1:{server.port}"


def unique_key(i: int, namespace: int) -> ChunkKey:
    return ChunkKey(namespace.to_bytes(16, "little"), i.to_bytes(16, "little"))


@pytest.fixture
def keyspace():
    """key(i): keys in a namespace no other test uses (servers are shared)."""
    ns = next(_namespaces)
    return lambda i: unique_key(i, ns)


def open_with(url: str, options: StoreOptions) -> ObjectStore:
    """The store of `url` opened with any StoreOptions (open_store sets only timeouts and pool size)."""
    parts = parse_url(url)
    module, name = backend_of(parts)
    store: ObjectStore = getattr(importlib.import_module(module), name)(parts, options)
    return store


def make_tier(url: str, **options: float) -> RemoteTier:
    return RemoteTier(open_store(url), SMALL, RawCodec(), RemoteOptions(**options))  # type: ignore[arg-type]


@pytest.fixture
def remote(remote_url) -> Iterator[RemoteTier]:
    tier = make_tier(remote_url, lookup_timeout=2.0, timeout=5.0)
    yield tier
    tier.check()
    tier.close()


def store_until_a_hit(engine: CacheEngine, seconds: float, base: int = 0) -> float:
    """Store and retrieve new prompts until one hits in full, checking every KV; the seconds it took."""
    start = time.monotonic()
    for i in itertools.count():
        tokens = [base + i * 100 + j for j in range(8)]
        kv = random_kv(SMALL, 8, seed=base + i)
        engine.store(tokens, kv)
        engine.flush(timeout=2.0)
        got = engine.retrieve(tokens)
        assert torch.equal(got, kv[:, :, : got.shape[2]]), f"wrong KV at step {i}"
        if got.shape[2] == 8:
            return time.monotonic() - start
        assert time.monotonic() - start < seconds, f"no hit within {seconds} s"
        time.sleep(0.05)
    raise AssertionError("itertools.count() ended")


__all__ = ["free_port", "kvtier_server", "make_tier", "server_url", "url_of"]
