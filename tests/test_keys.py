"""Chunk keys: chaining, determinism across processes, namespaces and bad tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.errors import TokenError
from kvtier.keys import ChunkHasher, ChunkKey, SaltedHashers, make_namespace, salted_namespace, token_bytes

NS = make_namespace("model", "layoutfp")


def hasher(hash_name="blake3", chunk=4, partial=True):
    return ChunkHasher(chunk, NS, hash_name, partial)


def test_chunk_boundaries_and_partial():
    chunks = hasher().chunks(list(range(10)))
    assert [(c.start, c.end) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert [(c.start, c.end) for c in hasher(partial=False).chunks(list(range(10)))] == [(0, 4), (4, 8)]
    assert hasher().chunks([]) == []


def test_digest_chains_over_the_prefix():
    a = hasher().chunks([1, 2, 3, 4, 5, 6, 7, 8])
    b = hasher().chunks([9, 2, 3, 4, 5, 6, 7, 8])  # same second chunk, different first
    assert a[1].key != b[1].key
    c = hasher().chunks([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert c[:2] == a  # a longer sequence shares the full chunks of its prefix


def test_partial_chunk_differs_from_full():
    full = hasher().chunks([1, 2, 3, 4])[0]
    part = hasher().chunks([1, 2, 3])[0]
    assert full.key != part.key and part.num_tokens == 3


def _spec_digest(name: str, tokens: list[int]) -> str:
    """The documented formula, computed independently of kvtier.keys."""
    import hashlib
    import struct

    import blake3
    import xxhash

    fn = {
        "blake3": lambda b: blake3.blake3(b).digest(16),
        "sha256": lambda b: hashlib.sha256(b).digest()[:16],
        "xxh128": xxhash.xxh3_128_digest,
    }[name]
    seed = fn(b"kvtier chunk chain v1")
    return fn(seed + struct.pack(f"<{len(tokens)}I", *tokens)).hex()


@pytest.mark.parametrize(
    ("name", "pinned"),
    [
        ("blake3", "cb83aa0f01a4e5399973d820fa5cbdeb"),
        ("sha256", "e188676e37cca72ffa23cfd3943f773e"),
        ("xxh128", "a9111b6e20fb3c4f77866009953652f8"),
    ],
)
def test_known_answers(name, pinned):
    """Digests are part of the on-disk format: changing them orphans every stored object."""
    digest = hasher(name).chunks([1, 2, 3, 4])[0].key.digest.hex()
    assert digest == _spec_digest(name, [1, 2, 3, 4]) == pinned


def test_input_types_agree():
    tokens = [5, 17, 2**31, 0, 7, 9]
    want = hasher().chunks(tokens)
    assert hasher().chunks(tuple(tokens)) == want
    assert hasher().chunks(np.array(tokens, dtype=np.int64)) == want
    assert hasher().chunks(torch.tensor(tokens, dtype=torch.int64)) == want
    assert token_bytes(tokens) == np.array(tokens, dtype="<u4").tobytes()


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, -2, 3], "in \\[0, 2\\*\\*32\\)"),
        ([1, 2**32], "in \\[0, 2\\*\\*32\\)"),
        ([1, 2.5], "must be ints"),
        ("abc", "sequence of ints"),
        (np.array([[1, 2]]), "one-dimensional"),
        (np.array([1.0, 2.0]), "must be integers"),
        (torch.tensor([-1, 2]), "in \\[0, 2\\*\\*32\\)"),
        (42, "sequence of ints"),
    ],
)
def test_bad_tokens(tokens, message):
    with pytest.raises(TokenError, match=message):
        hasher().chunks(tokens)


def test_start_offset():
    tokens = list(range(12))
    assert hasher().chunks(tokens, start=4) == hasher().chunks(tokens)[1:]
    with pytest.raises(ValueError, match="not a multiple"):
        hasher().chunks(tokens, start=3)


def test_namespaces_separate_everything():
    base = dict(rank=0, world_size=1, codec="raw", tenant="", hash_name="blake3")
    seen = {make_namespace("m", "l", **base)}
    for change in [{"rank": 1}, {"world_size": 2}, {"codec": "kivi"}, {"tenant": "t"}, {"hash_name": "sha256"}]:
        seen.add(make_namespace("m", "l", **(base | change)))
    seen.add(make_namespace("m2", "l", **base))
    seen.add(make_namespace("m", "l2", **base))
    assert len(seen) == 8


def test_salted_hashers_cut_alike_under_their_own_namespaces():
    base = hasher()
    hashers = SaltedHashers(base, keep=2)
    assert hashers.get(None) is hashers.get("") is base
    tokens = list(range(10))
    plain = [(c.start, c.end) for c in base.chunks(tokens)]
    a, b = hashers.get("a"), hashers.get("b")
    assert [(c.start, c.end) for c in a.chunks(tokens)] == plain
    namespaces = {base.namespace, a.namespace, b.namespace}
    assert len(namespaces) == 3 and a.namespace == salted_namespace(base.namespace, "a")
    assert {c.key.digest for c in a.chunks(tokens)} == {c.key.digest for c in base.chunks(tokens)}  # same chain
    assert hashers.get("a") is a
    hashers.get("c")  # keeps 2: "b" (least recently used) goes, and comes back equal
    assert hashers.get("b") is not b and hashers.get("b").namespace == b.namespace


def test_key_string_round_trip():
    key = hasher().chunks([1, 2, 3])[0].key
    text = str(key)
    assert text.startswith("kvtier/") and ChunkKey.parse(text) == key
    with pytest.raises(ValueError):
        ChunkKey.parse("kvtier/zz/00")


SCRIPT = """
import json, sys
from kvtier.keys import ChunkHasher, make_namespace
ns = make_namespace("model", "layoutfp", tenant="t")
out = {}
for name in ("blake3", "sha256", "xxh128"):
    chunks = ChunkHasher(256, ns, name).chunks(list(range(1000)))
    out[name] = [str(c.key) for c in chunks]
print(json.dumps(out))
"""


def test_keys_identical_across_processes_and_hash_seeds():
    results = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout))
    assert results[0] == results[1]
    assert len(results[0]["blake3"]) == 4
    assert len({k for keys in results[0].values() for k in keys}) == 12
