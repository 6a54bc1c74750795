"""Token chunking and chained chunk hashes: the identity of every stored KV chunk.

Chunk i covers tokens [i*C, min((i+1)*C, n)) for chunk size C. Its digest is

    digest(i) = H(digest(i-1) || tokens of chunk i as little-endian uint32)[:16]
    digest(-1) = H(b"kvtier chunk chain v1")[:16]            (the documented seed)

with H = blake3 (default), sha256 or xxh3-128. A digest therefore identifies a chunk *and its whole
prefix*, is identical across processes and machines, and never depends on Python's `hash()`.
A key also carries a namespace (model, KV layout, rank, codec, tenant, hash) so that KV of different
models, layouts, ranks or tenants never meet; a request may add a salt of its own (vLLM's
per-request cache salt, a LoRA adapter), from which `salted_namespace` derives another namespace
and `SaltedHashers` a hasher under it. String form:
`kvtier/<namespace hex>/<digest hex>`.
"""

from __future__ import annotations

import array
import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from kvtier.errors import TokenError

DIGEST_BYTES = 16
_MAX_TOKEN = 2**32


def _blake3() -> Callable[[bytes], bytes]:
    from blake3 import blake3

    return lambda data: blake3(data).digest(DIGEST_BYTES)


def _sha256() -> Callable[[bytes], bytes]:
    sha256 = hashlib.sha256
    return lambda data: sha256(data).digest()[:DIGEST_BYTES]


def _xxh128() -> Callable[[bytes], bytes]:
    from xxhash import xxh3_128_digest

    return xxh3_128_digest


# name -> factory of the hash function (factories keep optional imports lazy)
HASH_FUNCTIONS: dict[str, Callable[[], Callable[[bytes], bytes]]] = {
    "blake3": _blake3,
    "sha256": _sha256,
    "xxh128": _xxh128,
}


class ChunkKey(NamedTuple):
    """Identity of one stored chunk: a namespace and the chained digest of its tokens."""

    namespace: bytes
    digest: bytes

    def __str__(self) -> str:
        return f"kvtier/{self.namespace.hex()}/{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Inverse of str(): parse "kvtier/<namespace hex>/<digest hex>"."""
        parts = text.split("/")
        if len(parts) != 3 or parts[0] != "kvtier":
            raise ValueError(f"not a kvtier key: {text!r}")
        namespace, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        if len(namespace) != DIGEST_BYTES or len(digest) != DIGEST_BYTES:
            raise ValueError(f"not a kvtier key: {text!r}")
        return cls(namespace, digest)


class Chunk(NamedTuple):
    """A chunk of a token sequence: its key and the token range [start, end) it covers."""

    key: ChunkKey
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def make_namespace(
    model_id: str,
    layout_fingerprint: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    codec: str = "raw",
    tenant: str = "",
    hash_name: str = "blake3",
) -> bytes:
    """Return the 16-byte namespace that separates models, layouts, ranks, codecs and tenants.

    v2: chunks that v1 stored from vLLM's CPU backend hold its K blocks transposed (kvtier misread
    that layout), so nothing stored under v1 is found any more."""
    fields = (
        f"kvtier-namespace-v2\0model={model_id}\0layout={layout_fingerprint}\0rank={rank}"
        f"\0world={world_size}\0codec={codec}\0tenant={tenant}\0hash={hash_name}"
    )
    return hashlib.sha256(fields.encode()).digest()[:DIGEST_BYTES]


def token_bytes(tokens: Any) -> bytes:
    """Return token ids as little-endian uint32 bytes; raise TokenError for bad input."""
    if isinstance(tokens, np.ndarray) or hasattr(tokens, "numpy"):
        arr = _as_numpy(tokens)
        if arr.ndim != 1:
            raise TokenError(f"tokens must be one-dimensional, got shape {tuple(arr.shape)}")
        if arr.dtype.kind not in "iu":
            raise TokenError(f"tokens must be integers, got dtype {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= _MAX_TOKEN):
            raise TokenError(f"token ids must be in [0, 2**32), got range [{arr.min()}, {arr.max()}]")
        return arr.astype("<u4", copy=False).tobytes()
    if not isinstance(tokens, Sequence) or isinstance(tokens, (str, bytes)):
        raise TokenError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    try:
        buf = array.array("I")
        if isinstance(tokens, list):
            buf.fromlist(tokens)  # twice as fast as array.array("I", tokens) on a list
        else:
            buf.extend(tokens)
    except OverflowError:
        raise TokenError("token ids must be in [0, 2**32); found a negative or too large id") from None
    except TypeError as exc:
        raise TokenError(f"tokens must be ints: {exc}") from None
    if buf.itemsize != 4:  # pragma: no cover - every platform we support has 32-bit "I"
        return np.asarray(buf, dtype="<u4").tobytes()
    if sys.byteorder != "little":  # pragma: no cover
        buf.byteswap()
    return buf.tobytes()


def _as_numpy(tokens: Any) -> np.ndarray:
    if isinstance(tokens, np.ndarray):
        return tokens
    return tokens.detach().cpu().numpy()  # a torch tensor


class ChunkHasher:
    """Cuts token sequences into chunks and computes their chained keys."""

    __slots__ = ("_fn", "_seed", "chunk_size", "hash_name", "namespace", "save_partial")

    def __init__(
        self,
        chunk_size: int,
        namespace: bytes,
        hash_name: str = "blake3",
        save_partial: bool = True,
    ) -> None:
        if hash_name not in HASH_FUNCTIONS:
            raise ValueError(f"unknown hash {hash_name!r}; choose one of {', '.join(HASH_FUNCTIONS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.namespace = namespace
        self.hash_name = hash_name
        self.save_partial = save_partial
        self._fn = HASH_FUNCTIONS[hash_name]()
        self._seed = self._fn(b"kvtier chunk chain v1")

    def chunks(self, tokens: Any, start: int = 0) -> list[Chunk]:
        """Return the chunks of `tokens` (the trailing partial one if configured), from `start` on.

        `start` must be a multiple of the chunk size; digests still chain over the whole prefix.
        """
        return self.chunks_of_bytes(token_bytes(tokens), start)

    def chunks_of_bytes(self, data: bytes, start: int = 0) -> list[Chunk]:
        """Like chunks(), for tokens already converted by token_bytes()."""
        if start % self.chunk_size:
            raise ValueError(f"start {start} is not a multiple of the chunk size {self.chunk_size}")
        n = len(data) // 4
        size = self.chunk_size
        end = n if self.save_partial else n - n % size
        fn, ns, prev = self._fn, self.namespace, self._seed
        make = tuple.__new__  # NamedTuple construction without the Python-level __new__ (hot loop)
        out: list[Chunk] = []
        for lo in range(0, end, size):
            hi = lo + size if lo + size < end else end
            prev = fn(prev + data[lo * 4 : hi * 4])
            if lo >= start:
                out.append(make(Chunk, (make(ChunkKey, (ns, prev)), lo, hi)))
        return out


def salted_namespace(namespace: bytes, salt: str) -> bytes:
    """The namespace of requests that carry `salt` (non-empty) under `namespace`."""
    return hashlib.sha256(b"kvtier-salt-v1\0" + namespace + b"\0" + salt.encode()).digest()[:DIGEST_BYTES]


class SaltedHashers:
    """A ChunkHasher per request salt, all cutting chunks like `base` (the unsalted one), the most
    recently used `keep` of them kept."""

    def __init__(self, base: ChunkHasher, keep: int = 1024) -> None:
        self.base = base
        self._keep = keep
        self._hashers: OrderedDict[str, ChunkHasher] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, salt: str | None) -> ChunkHasher:
        """The hasher for `salt`; `base` for no salt (None or "")."""
        if not salt:
            return self.base
        with self._lock:
            hasher = self._hashers.get(salt)
            if hasher is None:
                b = self.base
                hasher = ChunkHasher(b.chunk_size, salted_namespace(b.namespace, salt), b.hash_name, b.save_partial)
                self._hashers[salt] = hasher
                if len(self._hashers) > self._keep:
                    self._hashers.popitem(last=False)
            else:
                self._hashers.move_to_end(salt)
            return hasher
