"""The vLLM scheduler's lookup (integration/vllm/lookup.py) on long prompts, against hashing alone.

The scheduler answers vLLM's `get_num_new_matched_tokens` for every waiting request at every step,
so its cost is paid on the scheduling path. This times, per prompt length, with the built-in model's
layout and 256-token chunks, every chunk held in the memory tier of each rank (published holdings,
`cluster/holdings.py`, mirrored over a real socket) and a disk tier configured:

- `hash`: the chained chunk digests of the prompt alone (blake3 over its token bytes): the floor;
- `new prompt`: a first lookup of the prompt (hashing, keys of every rank, set probes);
- `re-asked`: the same request asked again at the next step (vLLM asks a waiting request every
  step: the engine remembers the chunk keys of recent prompts).

Targets: a 128k-token prompt < 3 ms; re-asked < 1 ms per step.

    python -m benchmarks.lookup [--sizes 8000 32000 131072] [--ranks 1 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid

import torch

from benchmarks._common import median, report, timeit
from kvtier import CacheEngine, Config, KVLayout
from kvtier.cluster.holdings import HoldingsMirror, HoldingsPublisher, address
from kvtier.integration.vllm.lookup import SchedulerLookup
from kvtier.storage.cpu import CPUTier

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)  # the built-in model


def measure(tokens: list[int], ranks: int, repeat: int, disk: str) -> tuple[float, float, float]:
    """Median seconds: hashing alone, a new prompt's lookup, the same lookup re-asked."""
    config = Config.from_dict({"disk": {"path": disk}})
    engine_id = uuid.uuid4().hex
    names = [address(engine_id, r) for r in range(ranks)]
    scheduler = CacheEngine(config, LAYOUT, "bench", rank=0, world_size=ranks)
    chunks = scheduler.chunks(tokens)
    tiers = [CPUTier(1 << 40) for _ in range(ranks)]
    for rank, tier in enumerate(tiers):
        for key in scheduler.rank_keys(chunks, rank):
            tier.put(key, torch.empty(0))  # the mirror sees keys only: no KV needed
    publishers = [HoldingsPublisher(tier, name) for tier, name in zip(tiers, names, strict=True)]
    lookup = SchedulerLookup(scheduler, HoldingsMirror(names))
    try:
        assert lookup.mirror is not None and lookup.mirror.wait_connected(10)
        deadline = time.monotonic() + 10
        while lookup(tokens) != len(tokens) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lookup(tokens) == len(tokens), "the mirror did not catch up"
        hasher = scheduler.hasher
        hash_s = median(timeit(lambda: hasher.chunks(tokens), repeat))
        forget = scheduler._memo.clear  # the prompt's chunk keys are not remembered: a first lookup
        new_s = median(timeit(lambda: lookup(tokens), repeat, setup=forget))
        again_s = median(timeit(lambda: lookup(tokens), repeat))
    finally:
        lookup.close()
        for publisher in publishers:
            publisher.close()
        scheduler.close()
    return hash_s, new_s, again_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 32000, 131072], help="prompt lengths")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="tensor-parallel ranks")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (median reported)")
    args = parser.parse_args()
    rng = random.Random(0)
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as disk:
        for size in args.sizes:
            tokens = [rng.randrange(49152) for _ in range(size)]
            for ranks in args.ranks:
                hash_s, new_s, again_s = measure(tokens, ranks, args.repeat, disk)
                rows.append([size, ranks, hash_s * 1e3, new_s * 1e3, again_s * 1e3, new_s / hash_s])
                summary[f"{size}x{ranks}"] = {"hash_ms": hash_s * 1e3, "new_ms": new_s * 1e3, "again_ms": again_s * 1e3}
    headers = ["prompt tokens", "ranks", "hash (ms)", "new prompt (ms)", "re-asked (ms)", "new / hash"]
    report("lookup", headers, rows, summary)


if __name__ == "__main__":
    main()
