"""TTFT of the built-in model with transformers: cold prefill vs warm from kvtier's L1 and L2.

For each prompt length: the plain transformers prefill (one forward pass, no kvtier: the reference
of the speedup columns), the first request through kvtier (a miss: chunked prefill, then the chunks
are stored), the same prompt again (warm from L1), and the same prompt in a fresh engine whose L1
is empty (warm from the disk tier). Every row must produce the same tokens.
Target: warm >= 50x faster than cold at 8k tokens.

    python -m benchmarks.ttft_hf [--sizes 1024 4096 8000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import median, report
from kvtier import CacheEngine, Config
from kvtier.integration.hf import CachedModel
from kvtier.models import layout_of, load_default_model, model_id_of

NEW_TOKENS = 4


def corpus_ids(tokenizer, n: int) -> list[int]:
    """n token ids of a public-domain novel (see benchmarks/data/README.md)."""
    text = (Path(__file__).parent / "data" / "pride-and-prejudice-opening.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n:
        raise SystemExit(f"corpus has only {len(ids)} tokens")
    return ids[:n]


def plain_prefill(model, ids: list[int]) -> tuple[float, int]:
    """Seconds of one transformers forward pass over the prompt, and the first token."""
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(input_ids=torch.tensor([ids]), use_cache=True, **kwargs).logits
        first = int(logits[0, -1].argmax())
        return time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8000], help="prompt lengths")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the warm measurements")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    layout = layout_of(model)
    rows: list[list[object]] = []
    summary: dict[str, float | bool] = {"identical_tokens": True}
    disk = tempfile.mkdtemp(prefix="kvtier-ttft-")
    config = Config.from_dict({"disk": {"path": disk, "size": "8GiB"}, "l1": {"size": "4GiB"}})
    try:
        for n in args.sizes:
            ids = corpus_ids(tokenizer, n)
            plain_s, plain_first = plain_prefill(model, ids)
            engine = CacheEngine(config, layout, model_id_of(model))
            cached = CachedModel(model, engine)
            out_cold = cached.generate(ids, NEW_TOKENS).tolist()
            cold = cached.last_stats.ttft_s
            warm_l1, outs = [], []
            for _ in range(args.repeat):
                outs.append(cached.generate(ids, NEW_TOKENS).tolist())
                warm_l1.append(cached.last_stats.ttft_s)
            engine.close()  # flushes the disk writes
            warm_l2 = []
            for _ in range(args.repeat):
                with CacheEngine(config, layout, model_id_of(model)) as fresh:
                    restarted = CachedModel(model, fresh)
                    outs.append(restarted.generate(ids, NEW_TOKENS).tolist())
                    warm_l2.append(restarted.last_stats.ttft_s)
                    assert restarted.last_stats.cached_tokens == n - 1
            same = all(o == out_cold for o in outs) and out_cold[0][n] == plain_first
            summary["identical_tokens"] = bool(summary["identical_tokens"]) and same
            l1, l2 = median(warm_l1), median(warm_l2)
            # speedups against the plain transformers prefill, the no-cache reference
            rows.append([n, plain_s, cold, l1, l2, plain_s / l1, plain_s / l2, "yes" if same else "NO"])
            summary[f"speedup_l1_{n}"] = round(plain_s / l1, 1)
            summary[f"speedup_l2_{n}"] = round(plain_s / l2, 1)
            summary[f"hf_prefill_s_{n}"] = round(plain_s, 3)
            summary[f"cold_s_{n}"] = round(cold, 3)
            summary[f"warm_l1_s_{n}"] = round(l1, 4)
            shutil.rmtree(disk, ignore_errors=True)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    headers = ["tokens", "HF prefill (s)", "cold (s)", "warm L1 (s)", "warm L2 (s)", "L1 speedup", "L2 speedup",
               "same tokens"]  # fmt: skip
    report("ttft_hf", headers, rows, summary)


if __name__ == "__main__":
    main()
