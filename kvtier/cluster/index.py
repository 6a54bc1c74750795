"""The controller's index: which instance holds which chunk, in which of its tiers.

One dict maps a chunk's 32 key bytes (namespace + digest) to an int whose bit `slot * TIERS + tier`
says that the instance in `slot` holds the chunk in `tier`. With small ints shared by CPython, a
million chunks cost about 135 MB (measured) whatever the number of instances, and a lookup is one dict probe
and a few integer operations per chunk, for every instance at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvtier.cluster.events import KEY_BYTES, TIER_CODES, decode_records

TIERS = len(TIER_CODES)  # bits per instance slot
_SLOT_BITS = (1 << TIERS) - 1
_FOLDS = range(1, TIERS)  # shifts that fold a slot's tier bits onto its lowest bit


def slot_mask(slot: int) -> int:
    """The bits of every tier of `slot`."""
    return _SLOT_BITS << (slot * TIERS)


def slots_of(mask: int) -> Iterable[int]:
    """The slots with any bit set in `mask`."""
    while mask:
        low = mask & -mask
        slot = (low.bit_length() - 1) // TIERS
        yield slot
        mask &= ~slot_mask(slot)


class ChunkIndex:
    """Chunk key bytes -> instance slots and tiers holding it; per slot and tier, a chunk count."""

    def __init__(self) -> None:
        self._bits: dict[bytes, int] = {}
        self.counts: dict[int, list[int]] = {}  # slot -> chunks held per tier code

    def __len__(self) -> int:
        return len(self._bits)

    def apply(self, slot: int, blob: bytes) -> int:
        """Apply an event batch of `slot` (see events.py); return the number of events."""
        counts = self.counts.setdefault(slot, [0] * TIERS)
        bits = self._bits
        n = 0
        for tier, admitted, key in decode_records(blob):
            bit = 1 << (slot * TIERS + tier)
            old = bits.get(key, 0)
            if admitted:
                if not old & bit:
                    bits[key] = old | bit
                    counts[tier] += 1
            elif old & bit:
                new = old & ~bit
                if new:
                    bits[key] = new
                else:
                    del bits[key]
                counts[tier] -= 1
            n += 1
        return n

    def replace(self, slot: int, tiers: dict[int, bytes]) -> None:
        """Make `slot` hold exactly the keys of `tiers` (tier code -> keys back to back)."""
        self.drop(slot)
        counts = self.counts.setdefault(slot, [0] * TIERS)
        bits = self._bits
        for tier, blob in tiers.items():
            if len(blob) % KEY_BYTES:
                raise ValueError(f"snapshot of tier {tier} is not a whole number of {KEY_BYTES}-byte keys")
            bit = 1 << (slot * TIERS + tier)
            for at in range(0, len(blob), KEY_BYTES):
                key = blob[at : at + KEY_BYTES]
                old = bits.get(key, 0)
                if not old & bit:
                    bits[key] = old | bit
                    counts[tier] += 1

    def drop(self, slot: int) -> None:
        """Forget every chunk of `slot` (a full scan: for resyncs and removals, not requests)."""
        mask = slot_mask(slot)
        bits = self._bits
        for key in [k for k, v in bits.items() if v & mask]:
            new = bits[key] & ~mask
            if new:
                bits[key] = new
            else:
                del bits[key]
        self.counts.pop(slot, None)

    def prefixes(self, keys: Sequence[bytes], slots: Iterable[int]) -> dict[int, int]:
        """For each of `slots`, how many leading `keys` it holds in some tier."""
        live = 0
        for slot in slots:
            live |= slot_mask(slot)
        low = _low_bits(live.bit_length())
        out: dict[int, int] = {}
        bits = self._bits
        for i, key in enumerate(keys):
            v = folded = bits.get(key, 0)
            for shift in _FOLDS:
                folded |= v >> shift
            present = (folded & low) * _SLOT_BITS  # every bit of each slot that holds the key in some tier
            gone = live & ~present
            if gone:
                out.update(dict.fromkeys(slots_of(gone), i))
                live &= present
                if not live:
                    return out
        out.update(dict.fromkeys(slots_of(live), len(keys)))
        return out

    def holders(self, key: bytes) -> dict[int, list[int]]:
        """Slot -> tier codes holding `key`."""
        v = self._bits.get(key, 0)
        return {s: [t for t in range(TIERS) if v >> (s * TIERS + t) & 1] for s in slots_of(v)}

    def check(self) -> None:
        """Assert that the counts match the bits and no entry is empty."""
        counts: dict[int, list[int]] = {}
        for v in self._bits.values():
            assert v, "empty index entry"
            for slot in slots_of(v):
                per_tier = counts.setdefault(slot, [0] * TIERS)
                for t in range(TIERS):
                    per_tier[t] += v >> (slot * TIERS + t) & 1
        for slot, per_tier in self.counts.items():
            assert counts.get(slot, [0] * TIERS) == per_tier, (slot, counts.get(slot), per_tier)
        assert set(counts) <= set(self.counts), (set(counts), set(self.counts))


def _low_bits(nbits: int) -> int:
    """The lowest bit of every slot, for slots covering `nbits` bits."""
    groups = nbits // TIERS + 1
    return ((1 << (TIERS * groups)) - 1) // _SLOT_BITS
