"""KV events: the chunks each tier admits and evicts, batched for the controller.

Tiers call `EventBatcher.record` under their own lock (see `storage.base.TierListener`); it appends
one 33-byte record to a buffer under a lock of its own, so the hot path stays one append. The
agent's thread takes the buffer as a numbered batch. A batch is a flat byte string of records:

    code (u8: bit 0 = admitted, bits 1..7 = tier code) | namespace (16 bytes) | digest (16 bytes)

Only tiers an instance holds by itself report events (L1 and L2); a shared remote tier does not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from kvtier.keys import DIGEST_BYTES, ChunkKey

TIER_CODES = {"l1": 0, "l2": 1}  # tier name -> code in events; other tiers send no events
TIER_NAMES = {code: name for name, code in TIER_CODES.items()}
KEY_BYTES = 2 * DIGEST_BYTES
RECORD_BYTES = 1 + KEY_BYTES
_CODE_BYTES = [bytes([code]) for code in range(256)]


def encode_record(tier: int, admitted: bool, key: bytes) -> bytes:
    """One event record: the code byte and the 32 key bytes."""
    return _CODE_BYTES[(tier << 1) | admitted] + key


def decode_records(blob: bytes | memoryview) -> Iterator[tuple[int, bool, bytes]]:
    """(tier code, admitted, 32 key bytes) for each record of a batch; ValueError if it is torn or
    names an unknown tier (before the first record)."""
    if len(blob) % RECORD_BYTES:
        raise ValueError(f"event batch of {len(blob)} bytes is not a whole number of {RECORD_BYTES}-byte records")
    data = bytes(blob)
    if data and max(data[::RECORD_BYTES]) >> 1 >= len(TIER_NAMES):  # checked before any record is applied
        raise ValueError(f"event batch names a tier code beyond {len(TIER_NAMES) - 1} ({', '.join(TIER_CODES)})")
    for at in range(0, len(data), RECORD_BYTES):
        code = data[at]
        yield code >> 1, bool(code & 1), data[at + 1 : at + RECORD_BYTES]


def encode_keys(keys: Iterable[ChunkKey]) -> bytes:
    """The 32-byte forms of `keys`, back to back (snapshots)."""
    return b"".join(k.namespace + k.digest for k in keys)


class EventBatcher:
    """Collects tier events into numbered batches; bounded, and says when it overflowed."""

    def __init__(self, max_events: int = 1_000_000) -> None:
        self.max_events = max_events  # events buffered before they are dropped and a resync is due
        self.seq = 0  # number of the last batch taken
        self.overflowed = False  # events were dropped since the last reset(): the controller needs a resync
        self._buf = bytearray()
        self._lock = threading.Lock()

    def record(self, tier_name: str, admitted: bool, key: ChunkKey) -> None:
        """A TierListener: note that `tier_name` admitted (or dropped) `key`."""
        tier = TIER_CODES.get(tier_name)
        if tier is None:
            return
        with self._lock:
            if len(self._buf) >= self.max_events * RECORD_BYTES:
                self.overflowed = True
                return
            self._buf += encode_record(tier, admitted, key.namespace + key.digest)

    def take(self) -> tuple[int, bytes] | None:
        """The next batch (its number, its records), or None when no event is pending."""
        with self._lock:
            if not self._buf:
                return None
            self.seq += 1
            blob, self._buf = bytes(self._buf), bytearray()
            return self.seq, blob

    def put_back(self, seq: int, blob: bytes) -> None:
        """Return a batch that could not be sent; it goes out again, with the same number, first."""
        with self._lock:
            if seq != self.seq:
                raise ValueError(f"batch {seq} is not the last one taken ({self.seq})")
            self.seq -= 1
            self._buf[:0] = blob

    def reset(self) -> int:
        """Drop pending events and the overflow flag before a snapshot is read; return the batch
        number the snapshot continues from.

        A snapshot read after this call reflects every event dropped here, and every event after
        this call goes out in a later batch, so the controller converges to the tiers' contents.
        """
        with self._lock:
            self.overflowed = False
            self._buf = bytearray()
            return self.seq

    @property
    def pending(self) -> int:
        """Events waiting to be taken."""
        with self._lock:
            return len(self._buf) // RECORD_BYTES
