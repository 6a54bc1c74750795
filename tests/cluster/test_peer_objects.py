"""What a peer serves from its L1: valid framed objects, whose headers are computed once per tensor."""

from __future__ import annotations

import gc

import torch

from kvtier.cluster.peer import PeerObjects
from kvtier.codec import get_codec
from kvtier.codec.framing import decode_object
from kvtier.storage.cpu import CPUTier
from tests.conftest import SMALL, key, random_kv


def _served(objects, k):
    header, payload = objects.get_memory(k)
    return decode_object(bytes(header) + bytes(payload), k, SMALL, objects.codec)


def test_l1_chunks_are_served_framed_and_their_headers_reused_until_the_tensor_changes():
    l1 = CPUTier(1 << 20)
    objects = PeerObjects(l1, None, SMALL, get_codec("raw"))
    first = random_kv(SMALL, 4, seed=1)
    l1.put(key(0), first)
    l1.put(key(1), random_kv(SMALL, 4, seed=2))
    assert torch.equal(_served(objects, key(0)), first)
    assert objects.get_memory(key(0))[0] is objects.get_memory(key(0))[0]  # computed once
    assert torch.equal(_served(objects, key(1)), random_kv(SMALL, 4, seed=2))
    l1.delete(key(0))
    del first
    gc.collect()
    assert len(objects._headers) == 1  # forgotten with its tensor
    replacement = random_kv(SMALL, 4, seed=3)  # the same key stored again with other bits
    l1.put(key(0), replacement)
    assert torch.equal(_served(objects, key(0)), replacement)  # a new header, not the old checksum


def test_compressed_l1_chunks_are_encoded_per_request():
    l1 = CPUTier(1 << 20)
    objects = PeerObjects(l1, None, SMALL, get_codec("fp8"))
    kv = random_kv(SMALL, 4, seed=1)
    l1.put(key(0), kv)
    got = _served(objects, key(0))
    assert got.shape == kv.shape and not objects._headers
