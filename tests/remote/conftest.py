"""Fixtures: one real server per kind for the session, and a RemoteTier over each with unique keys."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.storage.remote import open_store
from kvtier.storage.remote.tier import RemoteOptions, RemoteTier
from tests.conftest import SMALL
from tests.remote.servers import ServerProcess, free_port, kvtier_server, redis_server, s3_server, s3_url

KINDS = ["redis", "s3", "fs", "kvtier"]
_namespaces = itertools.count(1000)


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, ServerProcess]]:
    started: dict[str, ServerProcess] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(params=KINDS)
def remote_url(request, servers, tmp_path) -> str:
    """A URL of a running remote of each kind (servers are shared by the session)."""
    return url_of(request.param, servers, tmp_path)


def url_of(kind: str, servers: dict[str, ServerProcess], tmp_path) -> str:
    if kind == "fs":
        return f"fs://{tmp_path / 'shared'}"
    if kind not in servers:
        servers[kind] = {"redis": redis_server, "s3": s3_server, "kvtier": kvtier_server}[kind]().start()
    port = servers[kind].port
    if kind == "s3":
        return s3_url(servers[kind], prefix=f"t{next(_namespaces)}")
    return f"{kind}://127.0.0.1:{port}"


def unique_key(i: int, namespace: int) -> ChunkKey:
    return ChunkKey(namespace.to_bytes(16, "little"), i.to_bytes(16, "little"))


@pytest.fixture
def keyspace():
    """key(i): keys in a namespace no other test uses (servers are shared)."""
    ns = next(_namespaces)
    return lambda i: unique_key(i, ns)


def make_tier(url: str, **options: float) -> RemoteTier:
    return RemoteTier(open_store(url), SMALL, RawCodec(), RemoteOptions(**options))  # type: ignore[arg-type]


@pytest.fixture
def remote(remote_url) -> Iterator[RemoteTier]:
    tier = make_tier(remote_url, lookup_timeout=2.0, timeout=5.0)
    yield tier
    tier.check()
    tier.close()


__all__ = ["free_port", "kvtier_server", "make_tier", "url_of"]
