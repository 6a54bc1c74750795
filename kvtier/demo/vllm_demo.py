"""`kvtier demo --engine vllm`: the long-document QA through vLLM, with and without KVTierConnector.

Three vLLM instances, each in its own process: one without kvtier, one with it (the first question
fills the cache), and a second kvtier instance that reuses the first one's KV from the disk tier.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from kvtier.demo import DOCUMENT_TITLE, QUESTIONS, document, prompt_ids
from kvtier.demo.hf_demo import DemoOptions, default_disk_path
from kvtier.report import format_table

# float32: with bf16 KV, resuming from a cached prefix changes the order of floating-point operations
# for the recomputed tokens (as vLLM's own prefix cache does) and can flip near-tie greedy tokens
DTYPE: Literal["float32"] = "float32"


def run(opts: DemoOptions) -> int:
    """Run the three instances; return 0 when every kvtier answer equals the plain one."""
    disk = Path(opts.disk_path) if opts.disk_path else default_disk_path()
    if not opts.keep_cache:
        shutil.rmtree(disk, ignore_errors=True)
    model = opts.model or str(_export())
    print(f"kvtier demo (vLLM): long-document QA on {opts.model or 'the built-in model'}")
    print(f"document: {DOCUMENT_TITLE}\n")
    questions = list(QUESTIONS[: opts.questions])
    print("vLLM without kvtier ...", flush=True)
    plain = _phase(model, questions, None, opts.max_new_tokens)
    print("vLLM with kvtier ...", flush=True)
    cached = _phase(model, questions, str(disk), opts.max_new_tokens)
    rows, ok = [], True
    for i, (a, b) in enumerate(zip(plain["answers"], cached["answers"], strict=True), start=1):
        same = a["ids"] == b["ids"]
        ok = ok and same
        rows.append([i, a["prompt_tokens"], a["ttft_s"], b["ttft_s"], a["ttft_s"] / b["ttft_s"], b["cached_tokens"],
                     "yes" if same else "NO"])  # fmt: skip
    headers = ["question", "prompt tokens", "TTFT no cache (s)", "TTFT kvtier (s)", "speedup", "cached tokens",
               "same answer"]  # fmt: skip
    print("\n" + format_table(headers, rows))
    print("\nanswers (with kvtier):")
    for i, answer in enumerate(cached["answers"], start=1):
        print(f"  [{i}] {answer['text']}")
    if opts.restart:
        print("\na second vLLM instance (new process, empty memory tier) asks question 1 ...", flush=True)
        again = _phase(model, questions[:1], str(disk), opts.max_new_tokens)["answers"][0]
        same = again["ids"] == plain["answers"][0]["ids"]
        ok = ok and same and again["cached_tokens"] > 0
        print(format_table(["instance", "TTFT (s)", "tokens from disk", "same answer"],
                           [["second", again["ttft_s"], again["cached_tokens"], "yes" if same else "NO"]]))  # fmt: skip
    return 0 if ok else 1


def _export() -> Path:
    from kvtier.models import export_default_model

    return export_default_model()


def _phase(model: str, questions: list[str], disk: str | None, max_new_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": model, "questions": questions, "disk": disk, "max_new": max_new_tokens}))
        cmd = [sys.executable, "-m", "kvtier", "demo", "--vllm-phase", str(job)]
        env = {"VLLM_LOGGING_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore", **os.environ}
        done = subprocess.run(cmd, check=False, env=env)
        result = Path(tmp) / "result.json"
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"the vLLM process failed with exit code {done.returncode}")
        data: dict[str, Any] = json.loads(result.read_text())
        return data


def phase(job_path: str) -> int:
    """One vLLM instance: answer the questions, report TTFT, answers and cached tokens as JSON."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the connector's counters are readable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = {}
    if job["disk"]:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integration.vllm", kv_role="kv_both",
            kv_load_failure_policy="recompute", kv_connector_extra_config={"disk": {"path": job["disk"]}},
        )  # fmt: skip
    llm = LLM(model=job["model"], max_model_len=8192, enable_prefix_caching=False, enforce_eager=True, dtype=DTYPE,
              disable_log_stats=False, seed=0, **kwargs)  # fmt: skip
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=job["max_new"])
    doc, answers = document(), []
    for question in job["questions"]:
        ids, _ = prompt_ids(tokenizer, doc, question)
        before = _retrieved()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        generated = list(out.outputs[0].token_ids)
        ttft = out.metrics.first_token_latency if out.metrics is not None else float("nan")
        answers.append({
            "prompt_tokens": len(ids), "ttft_s": ttft, "ids": generated,
            "cached_tokens": _retrieved() - before,
            "text": " ".join(tokenizer.decode(generated, skip_special_tokens=True).split()),
        })  # fmt: skip
    (Path(job_path).parent / "result.json").write_text(json.dumps({"answers": answers}))
    return 0


def _retrieved() -> int:
    from kvtier.integration.vllm import setup

    return sum(engine.counters.retrieved_tokens for engine in setup.engines())
