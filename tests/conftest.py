"""Shared fixtures: a small KV layout, deterministic random KV, temporary tiers."""

from __future__ import annotations

import pytest
import torch

from kvtier.codec.raw import RawCodec
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.storage import mapped
from kvtier.storage.cpu import CPUTier
from kvtier.storage.disk import DiskTier

SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)


@pytest.fixture
def layout() -> KVLayout:
    return SMALL


def random_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Deterministic canonical KV with distinct values everywhere."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(num_tokens), generator=gen).to(layout.dtype)


needs_cachestat = pytest.mark.skipif(not mapped._KERNEL.available, reason="cachestat(2) needs Linux 6.5+")


def is_mapped(path) -> bool:
    """Whether this process maps the file at `path` (mapped disk reads)."""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


def key(i: int, namespace: int = 0) -> ChunkKey:
    """A synthetic key."""
    return ChunkKey(namespace.to_bytes(16, "little"), i.to_bytes(16, "little"))


@pytest.fixture
def make_cpu():
    def make(capacity: int, policy: str = "lru") -> CPUTier:
        return CPUTier(capacity, policy)

    return make


@pytest.fixture
def make_disk(tmp_path):
    def make(capacity: int, policy: str = "lru", root=None, layout: KVLayout = SMALL) -> DiskTier:
        return DiskTier(root or tmp_path / "disk", capacity, layout, RawCodec(), policy)

    return make


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A test CA and a server certificate for 127.0.0.1 and localhost (tests/certs.py)."""
    from tests.certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))
