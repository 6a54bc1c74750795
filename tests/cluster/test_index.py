"""The controller's chunk index: events, snapshots, prefixes per instance."""

from __future__ import annotations

import random

from kvtier.cluster.events import encode_record
from kvtier.cluster.index import ChunkIndex

L1, L2 = 0, 1


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


def batch(*events: tuple[int, bool, int]) -> bytes:
    return b"".join(encode_record(tier, admitted, k(i)) for tier, admitted, i in events)


def test_admit_evict_per_tier():
    index = ChunkIndex()
    assert index.apply(0, batch((L1, True, 1), (L2, True, 1), (L1, True, 2))) == 3
    assert index.holders(k(1)) == {0: [L1, L2]}
    index.apply(0, batch((L1, False, 1), (L1, False, 9)))  # evicting an unknown key is harmless
    assert index.holders(k(1)) == {0: [L2]}
    index.apply(0, batch((L2, False, 1)))
    assert index.holders(k(1)) == {} and len(index) == 1
    assert index.counts[0] == [1, 0]
    index.check()


def test_prefixes_per_slot():
    index = ChunkIndex()
    index.apply(0, batch(*[(L1, True, i) for i in range(5)]))
    index.apply(3, batch(*[(L2, True, i) for i in range(8)]))
    index.apply(7, batch((L1, True, 1), (L1, True, 2)))  # no chunk 0: prefix 0
    keys = [k(i) for i in range(10)]
    assert index.prefixes(keys, [0, 3, 7]) == {0: 5, 3: 8, 7: 0}
    assert index.prefixes(keys, [0]) == {0: 5}
    assert index.prefixes(keys[:4], [0, 3]) == {0: 4, 3: 4}


def test_replace_and_drop():
    index = ChunkIndex()
    index.apply(1, batch((L1, True, 1), (L1, True, 2)))
    index.apply(2, batch((L1, True, 1)))
    index.replace(1, {L2: k(2) + k(3)})
    assert index.holders(k(1)) == {2: [L1]}
    assert index.holders(k(3)) == {1: [L2]}
    assert index.counts[1] == [0, 2]
    index.drop(2)
    assert len(index) == 2
    index.check()


def test_random_events_match_a_model():
    rng = random.Random(0)
    index = ChunkIndex()
    model: dict[tuple[int, int], set[int]] = {}
    for _ in range(200):
        events = []
        slot = rng.randrange(5)
        for _ in range(rng.randrange(1, 20)):
            tier, admitted, i = rng.randrange(2), rng.random() < 0.6, rng.randrange(30)
            events.append((tier, admitted, i))
            held = model.setdefault((slot, tier), set())
            (held.add if admitted else held.discard)(i)
        index.apply(slot, batch(*events))
        index.check()
    for i in range(30):
        expect = {}
        for (slot, tier), held in model.items():
            if i in held:
                expect.setdefault(slot, []).append(tier)
        assert index.holders(k(i)) == {s: sorted(t) for s, t in expect.items()}
