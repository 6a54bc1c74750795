"""TTFT through vLLM (CPU build) on the built-in model: kvtier against vLLM's own prefix cache and
vLLM's ExampleConnector, all measured in one run.

Rows, per prompt length: no connector (cold prefill); vLLM's prefix-cache hit (same process);
ExampleConnector warm from its disk files in a new process; kvtier warm from L1 (same process);
kvtier warm from its disk tier in a new process, as configured by default (loads end wherever the
hit does, so vLLM computes the prompt's last token only) and with `load_partial_blocks: false`
(loads end at a block boundary, as ExampleConnector's do: the same tokens computed, so the two
compare the loads alone). Every configuration runs in its own process; every row must produce the
same tokens. Targets: kvtier warm >= 50x faster than cold at 8k tokens; kvtier L2 in a new process
no slower than ExampleConnector; kvtier L1 within 1.5x of the prefix-cache hit.

Single TTFTs of new processes move by +-50 ms on a shared VM, more than the disk loads differ, so
the new-process rows run `--rounds` times, in an order that rotates every round, each process after
every stored file was read once (all in the page cache), and their rows are medians. "load"
columns time the connector's `start_load_kv` inside that TTFT.

    python -m benchmarks.ttft_vllm [--sizes 2048 4096 8000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import median, report

CORPUS = Path(__file__).parent / "data" / "pride-and-prejudice-opening.txt"
NEW_TOKENS = 4
# Seconds between requests: kvtier writes new chunks to disk and promotes disk hits into L1 on
# background threads after a request; on two cores, torch's OpenMP threads stall while any other
# thread runs, so without the pause the next row would measure that overlap, not its own path.
PAUSE_S = 2.0
DTYPE = "float32"  # identical tokens across rows; see kvtier/demo/vllm_demo.py
CONFIGS = {  # name: (connector, prefix caching, requests per prompt)
    "plain": (None, True, 2),  # cold, then vLLM's own prefix-cache hit
    "example_store": ("example", False, 1),
    "example_load": ("example", False, 1),
    "kvtier_store": ("kvtier", False, 2),  # cold, then warm from L1
    "kvtier_load": ("kvtier", False, 1),  # a new process: warm from the disk tier
    "kvtier_aligned": ("kvtier", False, 1),  # the same, loads stopping at block boundaries
}
NEW_PROCESS_ROWS = ("example_load", "kvtier_load", "kvtier_aligned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8000], help="prompt lengths")
    parser.add_argument("--rounds", type=int, default=5, help="rotations of the new-process rows (L2s and Example)")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.worker:
        worker(args.worker, args.sizes, args.dir)
        return
    root = tempfile.mkdtemp(prefix="kvtier-ttft-vllm-")
    try:
        results = {name: run_worker(name, args.sizes, root) for name in ("plain", "example_store", "kvtier_store")}
        loads: dict[str, list[dict[str, Any]]] = {name: [] for name in NEW_PROCESS_ROWS}
        for r in range(args.rounds):
            k = r % len(NEW_PROCESS_ROWS)
            for name in NEW_PROCESS_ROWS[k:] + NEW_PROCESS_ROWS[:k]:
                read_all(root)
                loads[name].append(run_worker(name, args.sizes, root, f" (round {r + 1} of {args.rounds})"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, summary = summarize(args.sizes, results, loads)
    headers = ["tokens", "cold (s)", "vLLM prefix hit", "Example warm", "kvtier cold", "kvtier L1", "kvtier L2",
               "kvtier L2 aligned", "L1 speedup", "L2 speedup", "L1 / hit", "L2 / Example", "L2 faster in",
               "aligned / Example", "load Example (ms)", "load kvtier L2 (ms)", "load aligned (ms)",
               "same tokens"]  # fmt: skip
    report("ttft_vllm", headers, rows, summary)


def summarize(
    sizes: list[int], results: dict[str, Any], loads: dict[str, list[dict[str, Any]]]
) -> tuple[list[list[object]], dict[str, Any]]:
    """Table rows and the JSON summary; the new-process rows are medians over the rounds."""
    rows: list[list[object]] = []
    rounds = len(loads["kvtier_load"])
    summary: dict[str, Any] = {"identical_tokens": True, "rounds": rounds}
    for n in sizes:
        key = str(n)
        plain, hit = results["plain"][key]["ttft"]
        kv_cold, l1 = results["kvtier_store"][key]["ttft"]
        examples = first_requests(loads["example_load"], key, "ttft")
        l2s = first_requests(loads["kvtier_load"], key, "ttft")
        aligned_all = first_requests(loads["kvtier_aligned"], key, "ttft")
        example, l2, aligned = median(examples), median(l2s), median(aligned_all)
        wins = sum(k < e for k, e in zip(l2s, examples, strict=True))
        load_example, load_l2, load_aligned = (
            median(first_requests(loads[name], key, "load")) * 1e3 for name in NEW_PROCESS_ROWS
        )
        runs = [*results.values(), *(run for name in NEW_PROCESS_ROWS for run in loads[name])]
        outputs = [o for run in runs for o in run[key]["tokens"]]
        same = all(o == outputs[0] for o in outputs)
        summary["identical_tokens"] = summary["identical_tokens"] and same
        rows.append([n, plain, hit, example, kv_cold, l1, l2, aligned, plain / l1, plain / l2, l1 / hit,
                     l2 / example, f"{wins} of {rounds}", aligned / example, load_example, load_l2, load_aligned,
                     "yes" if same else "NO"])  # fmt: skip
        summary |= {
            f"cold_s_{n}": round(plain, 3), f"prefix_hit_s_{n}": round(hit, 4), f"example_s_{n}": round(example, 4),
            f"kvtier_l1_s_{n}": round(l1, 4), f"kvtier_l2_s_{n}": round(l2, 4),
            f"speedup_l1_{n}": round(plain / l1, 1), f"speedup_l2_{n}": round(plain / l2, 1),
            f"l1_vs_prefix_hit_{n}": round(l1 / hit, 2), f"l2_vs_example_{n}": round(l2 / example, 2),
            f"l2_faster_in_{n}": wins, f"load_ms_example_{n}": round(load_example, 1),
            f"load_ms_kvtier_l2_{n}": round(load_l2, 1), f"kvtier_l2_aligned_s_{n}": round(aligned, 4),
            f"l2_aligned_vs_example_{n}": round(aligned / example, 2),
            f"load_ms_kvtier_l2_aligned_{n}": round(load_aligned, 1),
            f"example_s_all_{n}": [round(t, 4) for t in examples], f"kvtier_l2_s_all_{n}": [round(t, 4) for t in l2s],
            f"kvtier_l2_aligned_s_all_{n}": [round(t, 4) for t in aligned_all],
        }  # fmt: skip
    return rows, summary


def first_requests(runs: list[dict[str, Any]], key: str, field: str) -> list[float]:
    """`field` ("ttft" or "load") of each run's first request of the prompt `key`."""
    return [run[key][field][0] for run in runs]


def read_all(root: str) -> None:
    """Read every stored file once, so that both connectors' files are in the page cache alike."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            with path.open("rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def run_worker(name: str, sizes: list[int], root: str, note: str = "") -> dict[str, Any]:
    """Run one configuration in a new process; return its JSON result."""
    print(f"running {name}{note} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "benchmarks.ttft_vllm", "--worker", name, "--dir", root, "--sizes", *map(str, sizes)]
    env = {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore", **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def worker(name: str, sizes: list[int], root: str) -> None:
    """One vLLM instance: each prompt `requests` times; print TTFTs and tokens as a JSON line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvtier.models import export_default_model

    connector, prefix_caching, requests = CONFIGS[name]
    load_times = time_loads(connector)
    kwargs: dict[str, Any] = {}
    if connector == "kvtier":
        extra: dict[str, Any] = {"disk": {"path": os.path.join(root, "kvtier")}}
        if name == "kvtier_aligned":
            extra["load_partial_blocks"] = False
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integration.vllm", kv_role="kv_both",
            kv_load_failure_policy="recompute", kv_connector_extra_config=extra,
        )  # fmt: skip
    elif connector == "example":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": os.path.join(root, "example")},
        )  # fmt: skip
    model = str(export_default_model())
    ids = AutoTokenizer.from_pretrained(model)(CORPUS.read_text(), add_special_tokens=False).input_ids
    # one prefill step per prompt in every row: ExampleConnector saves only a request's first step
    llm = LLM(model=model, max_model_len=8192, max_num_batched_tokens=8192, enable_prefix_caching=prefix_caching,
              enforce_eager=True, dtype=DTYPE, disable_log_stats=False, seed=0, **kwargs)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    out: dict[str, Any] = {}
    offset = 0
    for n in sizes:  # disjoint prompts: ExampleConnector mixes up prompts that prefix each other
        prompt = TokensPrompt(prompt_token_ids=ids[offset : offset + n])
        offset += n
        ttfts, tokens, loaded = [], [], []
        for _ in range(requests):
            time.sleep(PAUSE_S)  # every row starts on an idle machine (see PAUSE_S)
            load_times.clear()
            result = llm.generate([prompt], params, use_tqdm=False)[0]
            assert result.metrics is not None
            ttfts.append(result.metrics.first_token_latency)
            tokens.append(list(result.outputs[0].token_ids))
            loaded.append(sum(load_times))
        out[str(n)] = {"ttft": ttfts, "tokens": tokens, "load": loaded}
    print("RESULT " + json.dumps(out), flush=True)


def time_loads(connector: str | None) -> list[float]:
    """Time every `start_load_kv` call of `connector` in this process (in-process engine): the
    returned list gets the seconds of each call."""
    times: list[float] = []
    if connector is None:
        return times
    if connector == "kvtier":
        from kvtier.integration.vllm import KVTierConnector as cls
    else:
        from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector as cls
    original = cls.start_load_kv

    def timed(self: Any, *args: Any, **kwargs: Any) -> None:
        began = time.perf_counter()
        try:
            original(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - began)

    cls.start_load_kv = timed  # type: ignore[method-assign]
    return times


if __name__ == "__main__":
    main()
