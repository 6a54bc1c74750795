"""`kvtier demo --engine hf`: long-document QA with and without kvtier, then a restart from disk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.config import Config
from kvtier.demo import DOCUMENT_TITLE, QUESTIONS, document, prompt_ids
from kvtier.integration.hf import CachedModel
from kvtier.models import DEFAULT_MODEL, load_model
from kvtier.report import format_table
from kvtier.units import format_size


@dataclass(slots=True)
class DemoOptions:
    model: str | None = None
    disk_path: str | None = None
    max_new_tokens: int = 32
    questions: int = len(QUESTIONS)
    keep_cache: bool = False
    restart: bool = True


def default_disk_path() -> Path:
    """The demo's disk tier: $XDG_CACHE_HOME/kvtier/demo-disk."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier" / "demo-disk"


def open_cached(model: Any, name: str | None, disk: Path, progress: bool = False) -> CachedModel:
    """The model over a kvtier node from the user's config, with the demo's disk directory as L2."""
    config = Config.load()
    config = config.replace(disk=dataclasses.replace(config.disk, path=str(disk)))
    return CachedModel.open(model, config, name, progress=progress)


def run(opts: DemoOptions) -> int:
    """Run the demo; return 0 when every answer with the cache equals the one without."""
    disk = Path(opts.disk_path) if opts.disk_path else default_disk_path()
    if not opts.keep_cache:
        shutil.rmtree(disk, ignore_errors=True)
    print(f"kvtier demo: long-document QA on {opts.model or DEFAULT_MODEL}")
    print(f"document: {DOCUMENT_TITLE}")
    print("loading the model ...", flush=True)
    model, tokenizer = load_model(opts.model)
    cached = open_cached(model, opts.model, disk, progress=True)
    assert cached.node is not None
    print(f"cache: L1 {format_size(cached.node.config.l1.size)} in memory, L2 on disk at {disk}\n")
    plain = CachedModel(model, None, progress=True)
    doc, rows, answers = document(), [], []
    first: tuple[list[int], list[int]] | None = None  # question 1's prompt and answer without kvtier
    for i, question in enumerate(QUESTIONS[: opts.questions], start=1):
        ids, shared = prompt_ids(tokenizer, doc, question)
        print(f"[{i}] {question}  ({len(ids)} prompt tokens, {shared} shared)", flush=True)
        without = plain.generate(ids, opts.max_new_tokens)
        base = plain.last_stats
        with_cache = cached.generate(ids, opts.max_new_tokens)
        hit = cached.last_stats
        same = bool((without == with_cache).all())
        if first is None:
            first = (ids, without[0].tolist())
        answers.append((i, _answer(tokenizer, with_cache, len(ids))))
        rows.append([i, len(ids), base.ttft_s, hit.ttft_s, base.ttft_s / hit.ttft_s, hit.cached_tokens, _yes(same)])
        print(f"    TTFT {base.ttft_s:.2f} s without kvtier, {hit.ttft_s:.2f} s with ({hit.cached_tokens} tokens "
              f"from cache); same answer: {_yes(same)}", flush=True)  # fmt: skip
    cached.close()
    headers = ["question", "prompt tokens", "TTFT no cache (s)", "TTFT kvtier (s)", "speedup", "cached tokens",
               "same answer"]  # fmt: skip
    print("\n" + format_table(headers, rows))
    print("\nanswers (with kvtier):")
    for i, text in answers:
        print(f"  [{i}] {text}")
    ok = all(row[-1] == "yes" for row in rows)
    if opts.restart and first is not None:
        ok = _restart(opts, disk, *first) and ok
    return 0 if ok else 1


def _restart(opts: DemoOptions, disk: Path, ids: list[int], expected: list[int]) -> bool:
    print("\nrestart: a new process with an empty L1 asks question 1 again, served from the disk tier ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": opts.model, "disk": str(disk), "ids": ids, "expected": expected,
                                   "max_new_tokens": opts.max_new_tokens}))  # fmt: skip
        cmd = [sys.executable, "-m", "kvtier", "demo", "--restart-check", str(job)]
        done = subprocess.run(cmd, check=False)
        if done.returncode not in (0, 1) or not (Path(tmp) / "result.json").exists():
            print(f"restart process failed with exit code {done.returncode}")
            return False
        result = json.loads((Path(tmp) / "result.json").read_text())
    print(format_table(
        ["process", "TTFT (s)", "tokens from disk", "same answer"],
        [["restarted", result["ttft_s"], result["cached_tokens"], _yes(result["same"])]],
    ))  # fmt: skip
    return bool(result["same"]) and result["cached_tokens"] > 0


def restart_check(job_path: str) -> int:
    """The second process of the demo: answer one prompt from the disk tier and report as JSON."""
    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    model, _ = load_model(job["model"])
    print(f"  model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    cached = open_cached(model, job["model"], Path(job["disk"]))
    out = cached.generate(job["ids"], job["max_new_tokens"])[0].tolist()
    cached.close()
    stats = cached.last_stats
    result = {"ttft_s": stats.ttft_s, "cached_tokens": stats.cached_tokens, "same": out == job["expected"]}
    (Path(job_path).parent / "result.json").write_text(json.dumps(result))
    return 0 if result["same"] else 1


def _answer(tokenizer: Any, ids: Any, prompt_len: int) -> str:
    return " ".join(tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).split())


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"
