"""Serving benchmark: vLLM's OpenAI-compatible server driven by the OpenAI Python client, with and without kvtier.

Two workloads, as LMCache's long-document QA and multi-round QA benchmarks run them, with streamed,
greedy chat completions (TTFT = the first content token):
- **Long-document QA**: `--docs` passages of `--doc-tokens` tokens from the public-domain books of
  ../shared/data; a warm-up round asks one question about each, then a query round asks each again,
  in shuffled order, with a new question; `--max-inflight` requests at once.
- **Multi-round QA**: `--users` users, each with a `--user-tokens` passage as system prompt, ask a
  question per round; each round's history holds the earlier questions and answers.

Arms (each a new server process; every arm with `VLLM_CPU_NUM_OF_RESERVED_CPU=1` and vLLM's prefix
cache on, as users run it):
  vllm            vLLM alone, its KV cache large enough for every document
  vllm-small      vLLM alone, its cache `--small-blocks` blocks (less than the workloads need)
  kvtier-mem      kvtier, default configuration (memory tier only), the large vLLM cache
  kvtier-mem-small, kvtier-disk-small   kvtier memory only / memory and disk, the small vLLM cache
  kvtier-restart  a new server on kvtier-disk-small's disk: the query round only
  vllm-bf16-small, kvtier-bf16-small    the same in bfloat16 (judged by vLLM alone's bf16 answers)
Each row reports mean, p50 and p90 TTFT, the round's wall time, and how many answers equal the
reference arm's (vllm for float32 arms, vllm-bf16-small for bf16). Plots (PNG) go to `--out`.

Targets: long-document query round, kvtier memory only: mean TTFT <= 1.1x vLLM alone when the
documents fit in vLLM's cache, <= 0.2x when they do not; the restarted server <= 0.1x the cold
warm-up round; multi-round QA rounds >= 2, kvtier memory only: <= 0.3x vLLM alone (small cache).

    python -m benchmarks.serve [--docs 4] [--doc-tokens 3000] [--users 4] [--rounds 3] [--arms ...]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks._common import report
from benchmarks.serve_client import Arm, Reply, Server, ask_all

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QUESTIONS = [
    "Who are the people in this passage? Answer in one sentence.",
    "Summarize what happens in this passage in one sentence.",
    "What is the mood of this passage? Answer in one sentence.",
    "Which places or objects are mentioned in this passage?",
    "What does the last paragraph of this passage say?",
    "Quote one line of dialogue from this passage.",
]
ARMS = ["vllm", "vllm-small", "kvtier-mem", "kvtier-mem-small", "kvtier-disk-small", "kvtier-restart",
        "vllm-bf16-small", "kvtier-bf16-small"]  # fmt: skip


def make_arms(names: list[str], small: int, disk: str) -> list[Arm]:
    defined = {
        "vllm": Arm("vllm"),
        "vllm-small": Arm("vllm-small", blocks=small),
        "kvtier-mem": Arm("kvtier-mem", kvtier={}),
        "kvtier-mem-small": Arm("kvtier-mem-small", kvtier={}, blocks=small),
        "kvtier-disk-small": Arm("kvtier-disk-small", kvtier={"disk": {"path": disk}}, blocks=small),
        "kvtier-restart": Arm(
            "kvtier-restart", kvtier={"disk": {"path": disk}}, blocks=small, restart_of="kvtier-disk-small"
        ),
        "vllm-bf16-small": Arm("vllm-bf16-small", dtype="bfloat16", blocks=small),
        "kvtier-bf16-small": Arm("kvtier-bf16-small", kvtier={}, dtype="bfloat16", blocks=small),
    }
    return [defined[name] for name in names]


def passages(tokenizer: Any, count: int, tokens: int, seed: int) -> list[str]:
    """`count` passages of about `tokens` tokens each, from the books of ../shared/data."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(DATA.glob("*.txt"))]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    rng = random.Random(seed)
    out = []
    for i in range(count):
        book = ids[i % len(ids)]
        start = rng.randrange(0, len(book) - tokens)
        out.append(tokenizer.decode(book[start : start + tokens]))
    return out


def long_document_qa(docs: list[str], seed: int) -> list[list[tuple[int, list[dict[str, str]]]]]:
    """Rounds of (index, messages): a warm-up round over every document, then a shuffled query round."""

    def messages(doc: str, question: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Read this passage.\n\n{doc}\n\n{question}"}]

    warmup = [(i, messages(doc, QUESTIONS[0])) for i, doc in enumerate(docs)]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    query = [(i, messages(docs[i], QUESTIONS[1 + i % (len(QUESTIONS) - 1)])) for i in order]
    return [warmup, query]


def run_arm(arm: Arm, args: argparse.Namespace, docs: list[str], users: list[str], out: Path,
            bar: tqdm) -> dict[str, Any]:  # fmt: skip
    """Start the arm's server, run the workloads, stop it; its replies and start-up seconds."""
    server = Server(arm, args.model, args.max_model_len, out / f"server-{arm.name}.log")
    bar.set_description(f"{arm.name}: starting")
    startup = server.start()
    replies: list[Reply] = []
    clock = time.perf_counter()
    try:
        rounds = long_document_qa(docs, args.seed)
        for r, requests in enumerate(rounds):
            if arm.restart_of and r == 0:
                continue  # the restarted server starts with the query round, on the first server's disk
            bar.set_description(f"{arm.name}: long-document QA round {r}")
            got = asyncio.run(ask_all(server.url, requests, args.max_inflight, args.max_tokens, clock, "longdoc", r))
            replies += got
            bar.update(len(got))
        if not arm.restart_of:
            replies += multi_round(server.url, users, args, clock, arm, bar)
    finally:
        bar.set_description(f"{arm.name}: stopping")
        server.stop()
    return {"startup_s": startup, "replies": replies}


def multi_round(url: str, users: list[str], args: argparse.Namespace, clock: float, arm: Arm,
                bar: tqdm) -> list[Reply]:  # fmt: skip
    """Each round, every user asks the next question; histories carry the earlier answers."""
    histories = [[{"role": "system", "content": f"You answer questions about this passage.\n\n{text}"}]
                 for text in users]  # fmt: skip
    replies: list[Reply] = []
    for r in range(args.rounds):
        bar.set_description(f"{arm.name}: multi-round QA round {r}")
        for history in histories:
            history.append({"role": "user", "content": QUESTIONS[r % len(QUESTIONS)]})
        requests = [(u, list(history)) for u, history in enumerate(histories)]
        got = asyncio.run(ask_all(url, requests, args.max_inflight, args.max_tokens, clock, "multiround", r))
        for reply in got:
            histories[reply.index].append({"role": "assistant", "content": reply.text})
        replies += got
        bar.update(len(got))
    return replies


def save(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Every arm's replies so far, as JSON."""
    data = {name: {"startup_s": r["startup_s"], "replies": [dataclasses.asdict(x) for x in r["replies"]]}
            for name, r in results.items()}  # fmt: skip
    path.write_text(json.dumps(data, indent=1))


def rows_of(results: dict[str, dict[str, Any]]) -> tuple[list[list[object]], dict[str, Any]]:
    """Table rows per (arm, workload, round) and the per-row summary."""
    rows: list[list[object]] = []
    summary: dict[str, Any] = {}
    for name, result in results.items():
        reference = results.get("vllm-bf16-small" if "bf16" in name else "vllm", {}).get("replies", [])
        answers = {(r.workload, r.round, r.index): r.text for r in reference}
        groups: dict[tuple[str, int], list[Reply]] = {}
        for reply in result["replies"]:
            groups.setdefault((reply.workload, reply.round), []).append(reply)
        for (workload, round_), replies in sorted(groups.items()):
            ttfts = sorted(r.ttft for r in replies)
            wall = max(r.started + r.total for r in replies) - min(r.started for r in replies)
            same = sum(answers.get((workload, round_, r.index)) == r.text for r in replies)
            cached = [r.cached_tokens for r in replies if r.cached_tokens is not None]
            stats = {"mean": statistics.fmean(ttfts), "p50": _pct(ttfts, 50), "p90": _pct(ttfts, 90), "wall": wall,
                     "same": same, "n": len(replies), "cached": sum(cached) if cached else None}  # fmt: skip
            summary[f"{name}/{workload}/{round_}"] = stats
            rows.append([name, workload, round_, len(replies), stats["mean"], stats["p50"], stats["p90"], wall,
                         "-" if stats["cached"] is None else stats["cached"], f"{same}/{len(replies)}"])  # fmt: skip
    return rows, summary


def _pct(sorted_values: list[float], pct: int) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))]


def targets(summary: dict[str, Any], rounds: int) -> dict[str, float]:
    """The issue's ratios, where both of their arms ran."""

    def mean(key: str) -> float | None:
        return summary[key]["mean"] if key in summary else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a / b, 3)

    later = [f"/multiround/{r}" for r in range(1, rounds)]

    def later_mean(arm: str) -> float | None:
        values = [mean(arm + suffix) for suffix in later]
        return None if not values or None in values else statistics.fmean(v for v in values if v is not None)

    found = {
        "longdoc_query_mem_vs_vllm_fits": ratio(mean("kvtier-mem/longdoc/1"), mean("vllm/longdoc/1")),
        "longdoc_query_mem_vs_vllm_small": ratio(mean("kvtier-mem-small/longdoc/1"), mean("vllm-small/longdoc/1")),
        "longdoc_query_disk_vs_vllm_small": ratio(mean("kvtier-disk-small/longdoc/1"), mean("vllm-small/longdoc/1")),
        "longdoc_restart_vs_cold_warmup": ratio(mean("kvtier-restart/longdoc/1"), mean("vllm-small/longdoc/0")),
        "multiround_later_mem_vs_vllm_small": ratio(later_mean("kvtier-mem-small"), later_mean("vllm-small")),
        "multiround_later_bf16_mem_vs_vllm": ratio(later_mean("kvtier-bf16-small"), later_mean("vllm-bf16-small")),
    }
    return {k: v for k, v in found.items() if v is not None}


def plot(results: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """TTFT of each request over time per arm, and mean TTFT per round and arm (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = ["longdoc", "multiround"]
    colors = {name: f"C{i}" for i, name in enumerate(results)}  # one color per arm in every panel
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, workload in zip(axes, workloads, strict=True):
        for name, result in results.items():
            replies = sorted((r for r in result["replies"] if r.workload == workload), key=lambda r: r.started)
            if replies:
                ax.plot([r.started for r in replies], [r.ttft for r in replies], marker="o", ms=3, label=name,
                        color=colors[name])  # fmt: skip
        ax.set(title=f"{workload}: TTFT of each request", xlabel="seconds since the arm's first request",
               ylabel="TTFT (s)", yscale="log")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    timeline = out / "serve_ttft_timeline.png"
    fig.tight_layout()
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, workload in zip(axes, workloads, strict=True):
        names = [n for n in results if any(r.workload == workload for r in results[n]["replies"])]
        rounds = sorted({r.round for n in names for r in results[n]["replies"] if r.workload == workload})
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            means = []
            for round_ in rounds:
                ttfts = [r.ttft for r in results[name]["replies"] if r.workload == workload and r.round == round_]
                means.append(statistics.fmean(ttfts) if ttfts else 0.0)
            ax.bar([x + i * width for x in range(len(rounds))], means, width, label=name, color=colors[name])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rounds))], [f"round {r}" for r in rounds])
        ax.set(title=f"{workload}: mean TTFT per round", ylabel="mean TTFT (s)", yscale="log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    per_round = out / "serve_round_means.png"
    fig.tight_layout()
    fig.savefig(per_round, dpi=110)
    plt.close(fig)
    return [timeline, per_round]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the built-in model, exported)")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--docs", type=int, default=4, help="documents of the long-document QA")
    parser.add_argument("--doc-tokens", type=int, default=3000)
    parser.add_argument("--users", type=int, default=4, help="users of the multi-round QA")
    parser.add_argument("--user-tokens", type=int, default=1500, help="each user's passage (system prompt)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the multi-round QA")
    parser.add_argument("--max-inflight", type=int, default=2, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--small-blocks", type=int, default=40, help="vLLM's KV cache in the *-small arms (x128)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder of the plots, logs and replies")
    parser.add_argument("--replot", help="only report and plot the replies of an earlier run (its serve_replies.json)")
    args = parser.parse_args()
    if args.replot:
        finish(load(Path(args.replot)), args, Path(args.out))
        return
    if "kvtier-restart" in args.arms and "kvtier-disk-small" not in args.arms:
        parser.error("kvtier-restart needs kvtier-disk-small (it restarts on that arm's disk)")
    from transformers import AutoTokenizer

    from kvtier.models import export_default_model

    args.model = args.model or str(export_default_model())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    docs = passages(tokenizer, args.docs, args.doc_tokens, args.seed)
    users = passages(tokenizer, args.users, args.user_tokens, args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    disk = tempfile.mkdtemp(prefix="kvtier-serve-")
    arms = make_arms(args.arms, args.small_blocks, disk)
    total = sum((0 if a.restart_of else 2 * args.docs + args.users * args.rounds) + args.docs * bool(a.restart_of)
                for a in arms)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    try:
        with tqdm(total=total, unit="request") as bar:
            for arm in arms:
                results[arm.name] = run_arm(arm, args, docs, users, out, bar)
                save(results, out / "serve_replies.json")  # after every arm: a later failure keeps them
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    finish(results, args, out)


def load(path: Path) -> dict[str, dict[str, Any]]:
    """The results `save` wrote."""
    data = json.loads(path.read_text())
    return {
        name: {"startup_s": r["startup_s"], "replies": [Reply(**x) for x in r["replies"]]} for name, r in data.items()
    }


def finish(results: dict[str, dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    """The table, the target ratios, the plots and the JSON line."""
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = rows_of(results)
    pngs = plot(results, out)
    headers = ["arm", "workload", "round", "requests", "mean TTFT (s)", "p50 (s)", "p90 (s)", "round (s)",
               "cached tokens", "same answers"]  # fmt: skip
    found = targets(summary, args.rounds)
    print("\n".join(f"{k}: {v}" for k, v in found.items()))
    startup = {name: round(result["startup_s"], 1) for name, result in results.items()}
    report("serve", headers, rows, {"targets": found, "plots": [str(p) for p in pngs], "rows": summary,
                                    "startup_s": startup})  # fmt: skip


if __name__ == "__main__":
    main()
