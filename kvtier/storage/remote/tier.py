"""RemoteTier: the Tier protocol over an ObjectStore, with framing, deadlines and a circuit breaker.

Objects are framed exactly as on disk (codec/framing.py), so every read is validated: a wrong, torn
or corrupt object is a counted miss and is deleted. Every call has a deadline (lookups a short one);
a failure is counted, logged once per burst and opens the breaker, so while the remote is down each
call returns a miss at once instead of waiting. The chain above goes on with L1, L2 and recompute.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from kvtier.codec import Codec
from kvtier.codec.framing import decode_object, encode_object
from kvtier.errors import CodecError, CorruptObjectError
from kvtier.keys import DIGEST_BYTES, ChunkKey
from kvtier.layout import KVLayout
from kvtier.logutil import BurstLog
from kvtier.storage.base import TierStats
from kvtier.storage.remote.breaker import Breaker
from kvtier.storage.remote.store import Buffer, MemberDown, ObjectStore

if TYPE_CHECKING:
    from kvtier.config import RemoteConfig

log = logging.getLogger("kvtier.storage.remote")
T = TypeVar("T")
# Objects read from a client library arrive as immutable bytes; the decoded tensor shares their memory
# (no copy) and, like every tier's tensor, is only ever read. torch warns about that sharing once.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Deadlines and back-off of a RemoteTier, in seconds."""

    lookup_timeout: float = 0.05  # one batched exists
    timeout: float = 2.0  # one get batch, put or delete
    backoff: float = 0.25  # first pause after a failure
    backoff_max: float = 10.0  # the pause doubles up to this
    get_batch: int = 8  # chunks fetched per round trip

    @classmethod
    def from_config(cls, config: RemoteConfig) -> RemoteOptions:
        return cls(
            config.lookup_timeout_ms / 1e3, config.timeout_ms / 1e3, config.backoff_ms / 1e3,
            config.backoff_max_ms / 1e3,
        )  # fmt: skip


class RemoteTier:
    """Canonical chunk tensors in a remote ObjectStore; failures degrade to misses."""

    def __init__(
        self,
        store: ObjectStore,
        layout: KVLayout,
        codec: Codec,
        options: RemoteOptions | None = None,
        *,
        engine_codec: str | None = None,
        name: str = "remote",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.store = store
        self.layout = layout
        self.codec = codec
        self.options = options or RemoteOptions()
        self.stats = TierStats()
        self.breaker = Breaker(self.options.backoff, self.options.backoff_max, clock)
        self._burst = BurstLog(log)
        # The codec is part of an object's identity: a tier whose codec spec (with its options)
        # differs from the engine's stores under a namespace derived from both, so engines with
        # other codecs never read it. `engine_codec` is the engine's canonical spec.
        self._ns_salt = None if engine_codec in (None, codec.spec) else f"codec={codec.spec}".encode()
        self._ns_cache: dict[bytes, bytes] = {}
        self._down = False  # the last call failed (logged once when the remote answers again)

    # --- the Tier protocol -----------------------------------------------------------------------

    def contains(self, key: ChunkKey) -> bool:
        return self.prefix_len([key]) == 1

    def prefix_len(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        names = [self._remote_key(k) for k in keys]
        found = self._call("lookup", lambda: self.store.exists(names, self.options.lookup_timeout), None)
        if found is None:
            return 0
        for i, present in enumerate(found):
            if not present:
                return i
        return len(found)

    def get(self, key: ChunkKey) -> torch.Tensor | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """The tensors of `keys` in order (None where missing, corrupt or failed), batched."""
        out: list[torch.Tensor | None] = []
        step = self.options.get_batch
        for lo in range(0, len(keys), step):
            batch = [self._remote_key(k) for k in keys[lo : lo + step]]
            got = self._call("get", functools.partial(self.store.get, batch, self.options.timeout), None)
            if got is None:
                out.extend([None] * (len(keys) - lo))
                self.stats.misses += len(keys) - lo
                break
            out.extend(self._decode(k, data) for k, data in zip(batch, got, strict=True))
        return out

    def put(self, key: ChunkKey, kv: torch.Tensor) -> bool:
        rkey = self._remote_key(key)
        try:
            header, payload = encode_object(rkey, self.layout, self.codec, kv)
        except CodecError as exc:
            self._burst.warning("encode", "%s: cannot store %s: %s", self.name, key, exc)
            self.stats.put_failures += 1
            return False

        def put() -> bool:
            self.store.put(rkey, [header, payload], self.options.timeout)
            return True

        ok = self._call("put", put, False)
        if ok:
            self.stats.puts += 1
            self.stats.bytes_written += kv.nbytes
        else:
            self.stats.put_failures += 1
        return bool(ok)

    def delete(self, key: ChunkKey) -> bool:
        rkey = self._remote_key(key)
        return bool(self._call("delete", lambda: self.store.delete(rkey, self.options.timeout), False))

    def close(self) -> None:
        self.store.close()

    def check(self) -> None:
        counters = self.stats.as_dict()
        assert all(value >= 0 for value in counters.values()), counters

    # --- internals -------------------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[[], T], failed: T) -> T:
        """Run one store call under the breaker; any failure is counted, logged and returns `failed`."""
        if not self.breaker.allow():
            self.stats.unavailable += 1
            return failed
        try:
            result = fn()
        except MemberDown as exc:  # one peer of several: a miss, and only that peer pauses
            self.stats.errors += 1
            self._burst.warning(op, "%s: %s failed: %s", self.name, op, exc)
            return failed
        except Exception as exc:  # a remote failure of any kind degrades to a miss; the request goes on
            self.stats.errors += 1
            pause = self.breaker.failure()
            self._down = True
            self._burst.warning(
                op, "%s: %s on %s failed (%s: %s); treating it as unavailable for %.2f s",
                self.name, op, self.store.where, type(exc).__name__, exc, pause,
            )  # fmt: skip
            return failed
        self.breaker.success()
        if self._down:
            self._down = False
            log.warning("%s: %s answers again", self.name, self.store.where)
        return result

    def _decode(self, key: ChunkKey, data: Buffer | None) -> torch.Tensor | None:
        if data is None:
            self.stats.misses += 1
            return None
        try:
            kv = decode_object(data, key, self.layout, self.codec)
        except CorruptObjectError as exc:
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._burst.warning("corrupt", "%s: deleting corrupt object %s: %s", self.name, key, exc)
            self._call("delete", lambda: self.store.delete(key, self.options.timeout), False)
            return None
        self.stats.hits += 1
        self.stats.bytes_read += kv.nbytes
        return kv

    def _remote_key(self, key: ChunkKey) -> ChunkKey:
        if self._ns_salt is None:
            return key
        ns = self._ns_cache.get(key.namespace)
        if ns is None:
            ns = hashlib.sha256(key.namespace + self._ns_salt).digest()[:DIGEST_BYTES]
            self._ns_cache[key.namespace] = ns
        return ChunkKey(ns, key.digest)
