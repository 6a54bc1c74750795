"""The byte-level protocol every remote backend implements, below the RemoteTier that frames objects.

A backend moves whole stored objects (the framed bytes of codec/framing.py: header + payload) named by
their chunk key. It knows nothing about tensors, layouts, retries or breakers: RemoteTier owns those.
Every call takes a `timeout` in seconds that the backend enforces with its client's own mechanism
(socket timeouts, request timeouts); a failure raises (any exception), a missing object is None/False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import SplitResult

from kvtier.keys import ChunkKey
from kvtier.tls import ClientTLS

Buffer = bytes | bytearray | memoryview


class MemberDown(Exception):
    """One member of a store that spans several servers failed (a peer instance): the store as a
    whole still answers through its other members, so RemoteTier counts and logs the failure and
    treats the call as a miss, without pausing the whole store. The store keeps its own per-member
    back-off."""


class ObjectStore(Protocol):
    """Whole framed objects under chunk keys, with batched existence checks and reads."""

    scheme: str  # the URL scheme it was opened with ("redis", "s3", "fs", "kvtier")
    where: str  # a human-readable location without credentials, for logs ("redis://127.0.0.1:6379/0")

    def exists(self, keys: Sequence[ChunkKey], timeout: float) -> list[bool]:
        """Which of `keys` are stored, in one round trip where the backend allows."""
        ...

    def get(self, keys: Sequence[ChunkKey], timeout: float) -> list[Buffer | None]:
        """The objects stored under `keys` (None where absent), batched where the backend allows."""
        ...

    def put(self, key: ChunkKey, parts: Sequence[Buffer], timeout: float) -> None:
        """Store the concatenation of `parts` under `key`; readers never see a partial object."""
        ...

    def delete(self, key: ChunkKey, timeout: float) -> bool:
        """Remove `key`; True if it was there (False also when the backend cannot tell)."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """What every backend factory receives besides the URL."""

    connect_timeout: float = 0.5  # seconds to open a connection
    max_connections: int = 8  # connections (or concurrent requests) per store
    max_object: int = 1 << 30  # bytes: largest object a get accepts; a larger reply is an error, not allocated
    tls: ClientTLS = field(default_factory=ClientTLS)  # how kvtiers:// checks its server (Config.tls)


class StoreFactory(Protocol):
    """`open_store(url, options)`: what a backend module registers under its URL scheme."""

    def __call__(self, url: SplitResult, options: StoreOptions) -> ObjectStore: ...


def object_name(key: ChunkKey) -> str:
    """The name of `key`'s object in remote stores: "kvtier/<namespace hex>/<digest hex>"."""
    return str(key)
