"""Tier events: tiers report admitted and removed keys; the batcher numbers batches."""

from __future__ import annotations

import pytest

from kvtier.cluster.events import RECORD_BYTES, EventBatcher, decode_records, encode_keys
from tests.conftest import SMALL, key, random_kv

CHUNK_BYTES = SMALL.bytes_per_token * 4


def test_cpu_tier_reports_puts_and_evictions(make_cpu):
    tier = make_cpu(2 * CHUNK_BYTES)
    seen: list[tuple[str, bool, object]] = []
    tier.listeners.append(lambda name, admitted, k: seen.append((name, admitted, k)))
    for i in range(3):
        tier.put(key(i), random_kv(SMALL, 4, i))
    tier.put(key(2), random_kv(SMALL, 4, 2))  # already held: no event
    tier.delete(key(2))
    assert seen == [("l1", True, key(0)), ("l1", True, key(1)), ("l1", False, key(0)), ("l1", True, key(2)),
                    ("l1", False, key(2))]  # fmt: skip


def test_disk_tier_reports_puts_evictions_and_deletes(make_disk):
    tier = make_disk(2 * (CHUNK_BYTES + 128))
    seen: list[tuple[bool, object]] = []
    tier.listeners.append(lambda name, admitted, k: seen.append((admitted, k)))
    for i in range(3):
        tier.put(key(i), random_kv(SMALL, 4, i))
    tier.delete(key(1))
    assert seen == [(True, key(0)), (True, key(1)), (False, key(0)), (True, key(2)), (False, key(1))]
    tier.check()


def test_batches_are_numbered_and_decode_in_order():
    batcher = EventBatcher()
    assert batcher.take() is None
    batcher.record("l1", True, key(1))
    batcher.record("l2", False, key(2))
    batcher.record("remote", True, key(3))  # shared tiers send no events
    seq, blob = batcher.take()
    assert seq == 1 and len(blob) == 2 * RECORD_BYTES
    assert list(decode_records(blob)) == [(0, True, encode_keys([key(1)])), (1, False, encode_keys([key(2)]))]
    batcher.record("l1", True, key(4))
    assert batcher.take()[0] == 2


def test_put_back_resends_the_same_batch_first():
    batcher = EventBatcher()
    batcher.record("l1", True, key(1))
    seq, blob = batcher.take()
    batcher.record("l1", True, key(2))
    batcher.put_back(seq, blob)
    again = batcher.take()
    assert again[0] == seq and again[1][:RECORD_BYTES] == blob


def test_overflow_drops_events_until_reset():
    batcher = EventBatcher(max_events=2)
    for i in range(3):
        batcher.record("l1", True, key(i))
    assert batcher.overflowed and batcher.pending == 2
    assert batcher.reset() == 0
    assert not batcher.overflowed and batcher.pending == 0


def test_torn_batch_is_rejected():
    with pytest.raises(ValueError, match="whole number"):
        list(decode_records(b"x" * (RECORD_BYTES + 1)))
