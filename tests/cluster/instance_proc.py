"""A cache instance for the cluster tests: a kvtier Node in a process, driven by JSON lines on stdin.

Commands (one JSON object per line; one JSON answer per line on stdout):
  {"op": "store", "tokens": [...]}   store random KV for the tokens, then wait until the controller has the events
  {"op": "lookup", "tokens": [...]}   engine.lookup (counted in the stats heartbeats carry)
  {"op": "retrieve", "tokens": [...], "repeat"?: n}
                                     the cached prefix: its length, an xxh3 digest of its KV, seconds per try
  {"op": "expected", "tokens": [...]} the digest of the KV "store" would store for the tokens
  {"op": "keys"}                     the digests (hex) each tier holds now
  {"op": "sync"}                     wait until every store and event is delivered
The config comes from KVTIER_* variables (cluster.controller_url, cluster.instance_id, l1, disk).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import xxhash

from kvtier import Config
from kvtier.node import Node
from tests.conftest import SMALL, random_kv


def digest(kv: torch.Tensor) -> str:
    return xxhash.xxh3_128_hexdigest(kv.contiguous().numpy().tobytes())


def main() -> int:
    node = Node(Config.load(), SMALL, model_id="test-model")
    engine = node.engine
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "store":
            tokens = cmd["tokens"]
            stored = engine.store(tokens, random_kv(SMALL, len(tokens), seed=len(tokens)))
            answer: dict = {"stored": stored}
        elif cmd["op"] == "lookup":
            answer = {"tokens": engine.lookup(cmd["tokens"])}
        elif cmd["op"] == "retrieve":
            seconds = []  # with "repeat": 2, a second retrieve right after the first (no round trip between)
            for _ in range(cmd.get("repeat", 1)):
                began = time.perf_counter()
                kv = engine.retrieve(cmd["tokens"])
                seconds.append(time.perf_counter() - began)
            answer = {"tokens": kv.shape[2], "digest": digest(kv), "seconds": seconds}
        elif cmd["op"] == "expected":  # what store() stored for these tokens, without storing it
            answer = {"digest": digest(random_kv(SMALL, len(cmd["tokens"]), seed=len(cmd["tokens"])))}
        elif cmd["op"] == "keys":
            answer = {t.name: [k.digest.hex() for k in t.held_keys()] for t in engine.chain.tiers}  # type: ignore[attr-defined]
        elif cmd["op"] == "sync":
            answer = {}
        else:
            answer = {"error": f"unknown op {cmd['op']!r}"}
        engine.flush()
        answer["synced"] = node.agent.flush(10.0)
        print(json.dumps(answer), flush=True)
    node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
