"""KVTierConnector in the real vLLM CPU engine: reuse across processes, identical greedy outputs.

Every engine runs in its own process (tests/integration/vllm_runner.py), as separate vLLM
instances would; each test compares against a run of the same rounds without the connector.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]
RUNNER = Path(__file__).with_name("vllm_runner.py")
CORPUS = Path(__file__).parents[2] / "benchmarks" / "data" / "pride-and-prejudice-opening.txt"
LOADED = re.compile(r"loaded (\d+) tokens \[")


@pytest.fixture(scope="module")
def corpus() -> list[int]:
    from transformers import AutoTokenizer

    from kvtier.models import export_default_model

    tokenizer = AutoTokenizer.from_pretrained(export_default_model())
    return tokenizer(CORPUS.read_text(), add_special_tokens=False).input_ids


def run(tmp_path: Path, rounds: list[list[list[int]]], disk: Path | None = None, **flags) -> dict:
    """Run the rounds in a new vLLM process; return outputs, stats and tokens loaded per request."""
    prompts = tmp_path / f"prompts-{len(list(tmp_path.iterdir()))}.json"
    prompts.write_text(json.dumps(rounds))
    cmd = [sys.executable, str(RUNNER), str(prompts)]
    if disk is not None:
        cmd += ["--disk", str(disk)]
    for flag, value in flags.items():
        if value is not False:
            cmd += [f"--{flag.replace('_', '-')}"] + ([] if value is True else [str(value)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    result["loaded"] = [int(n) for n in LOADED.findall(done.stderr)]
    result["stderr"] = done.stderr
    return result


def run_matching_plain(tmp_path: Path, rounds: list[list[list[int]]], disk: Path, **flags) -> dict:
    """Run the rounds with the connector, then without; require identical outputs; return the first."""
    cached = run(tmp_path, rounds, disk, **flags)
    plain = run(tmp_path, rounds, **flags)
    assert cached["outputs"] == plain["outputs"]
    return cached


def test_second_instance_reuses_the_first_ones_kv(tmp_path, corpus):
    prompt = corpus[:3000]
    disk = tmp_path / "disk"
    first = run(tmp_path, [[prompt]], disk)
    assert first["stats"]["engine"]["stored_tokens"] == 3000
    second = run(tmp_path, [[prompt]], disk)
    plain = run(tmp_path, [[prompt]])
    assert second["loaded"] == [2999]  # all but the last token, which vLLM computes to sample from
    assert second["stats"]["l2"]["hits"] >= 11
    assert second["outputs"] == first["outputs"] == plain["outputs"]


@pytest.mark.skipif(
    not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
    reason="vLLM's CPU fp8 KV cache needs AVX-512 or AMX",
)
def test_fp8_kv_cache_is_reused_across_instances(tmp_path, corpus):
    prompt = corpus[:1000]
    disk = tmp_path / "disk"
    first = run(tmp_path, [[prompt]], disk, kv_cache_dtype="fp8")
    second = run(tmp_path, [[prompt]], disk, kv_cache_dtype="fp8")
    plain = run(tmp_path, [[prompt]], kv_cache_dtype="fp8")
    assert second["loaded"] == [999] and second["stats"]["l2"]["hits"] >= 4
    assert second["outputs"] == first["outputs"] == plain["outputs"]
    # a whole chunk: 256 tokens x 30 layers x K, V x 3 heads x 64, one byte each, and the header
    assert max(p.stat().st_size for p in disk.rglob("*.kv")) == 256 * 30 * 2 * 3 * 64 + 128


@pytest.mark.parametrize(("partial_blocks", "loaded"), [(True, [49, 511, 768]), (False, [384, 768])])
def test_shared_prefixes_short_prompts_and_whole_chunks(tmp_path, corpus, partial_blocks, loaded):
    long = corpus[:1300]
    rounds = [
        [long, corpus[5000:5050], corpus[6000:6512]],
        # shares 1,000 tokens with `long`; shorter than a block; exactly two chunks again
        [long[:1000] + corpus[7000:7200], corpus[5000:5050], corpus[6000:6512]],
    ]
    extra = json.dumps({"load_partial_blocks": partial_blocks})
    cached = run_matching_plain(tmp_path, rounds, tmp_path / "disk", extra=extra)
    # round 2: the 3 whole chunks (768 tokens) of the shared prefix; the 50-token and 512-token
    # prompts but their last token (which vLLM computes), or, when loads stop at block boundaries,
    # nothing of the prompt shorter than a block and the other up to its last block
    assert sorted(cached["loaded"]) == loaded


def test_batch_of_eight_with_hits_and_misses(tmp_path, corpus):
    first = [corpus[i * 700 : i * 700 + 600] for i in range(4)]
    fresh = [corpus[3000 + i * 500 : 3000 + i * 500 + 450] for i in range(4)]
    rounds = [first, [p for pair in zip(first, fresh, strict=True) for p in pair]]
    cached = run_matching_plain(tmp_path, rounds, tmp_path / "disk")
    assert len(cached["loaded"]) == 4 and all(n == 599 for n in cached["loaded"])


def test_multiprocess_mode_scheduler_and_worker_apart(tmp_path, corpus):
    prompt = corpus[:2000]
    rounds = [[prompt], [prompt]]
    cached = run_matching_plain(tmp_path, rounds, tmp_path / "disk", mp=True)
    assert cached["stats"] is None  # the worker is another process; its log says what it loaded
    assert cached["loaded"] == [1999]


@pytest.mark.parametrize("mp", [False, True], ids=["in-process", "multiprocess"])
def test_the_memory_tier_alone_is_reused_in_both_process_modes(tmp_path, corpus, mp):
    # the default configuration (L1 only, no disk): the scheduler counts what the worker holds in
    # memory through its published keys, also from another process
    rounds = [[corpus[:3000]], [corpus[:3000]]]
    cached = run(tmp_path, rounds, memory_only=True, mp=mp)
    assert cached["loaded"] == [2999]
    assert "vLLM's scheduler reuses KV from the workers' memory (L1 4.0 GiB per rank)" in cached["stderr"]
    assert cached["outputs"] == run(tmp_path, rounds, mp=mp)["outputs"]


def test_bf16_reuse_gives_the_cold_runs_tokens_or_vllms_own_prefix_hits(tmp_path, corpus):
    # bf16, the dtype vLLM serves most models in: a resumed prefill computes its last tokens in
    # another batch shape than a cold one, so near-tie greedy tokens may differ; vLLM's own prefix
    # cache behaves the same. The reused run must give one of the two.
    prompt = corpus[:3000]
    rounds = [[prompt], [prompt]]
    cached = run(tmp_path, rounds, memory_only=True, dtype="bfloat16")
    assert cached["loaded"] == [2999]
    vllm_alone = run(tmp_path, rounds, dtype="bfloat16", prefix_caching=True)  # cold, then its own prefix hit
    assert cached["outputs"][0] == vllm_alone["outputs"][0]
    assert cached["outputs"][1] in (vllm_alone["outputs"][0], vllm_alone["outputs"][1])


def test_corrupt_object_is_recomputed_and_stored_again(tmp_path, corpus):
    whole, shorter = corpus[:2048], corpus[:2000]
    disk = tmp_path / "disk"
    run(tmp_path, [[whole]], disk)
    files = sorted(disk.rglob("*.kv"), key=lambda p: p.stat().st_mtime)
    victim = files[3]  # the fourth chunk: tokens 768..1024
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(data)
    # `shorter` finds 7 whole chunks, but its load stops at the corrupt one; vLLM recomputes from
    # there. The step of the failed load attended to blocks never filled: none of its KV (here the
    # partial chunk 1792..2000) may be stored; the recomputed chunks are, the corrupt one again too.
    second = run(tmp_path, [[shorter]], disk)
    assert "deleting corrupt object" in second["stderr"]
    assert second["stats"]["l2"]["corrupt"] == 1
    assert second["loaded"] == [768]
    third = run_matching_plain(tmp_path, [[whole], [shorter]], disk)
    assert third["loaded"] == [2047, 1999] and third["stats"]["l2"]["corrupt"] == 0
    assert second["outputs"][0] == third["outputs"][1]


def test_requests_with_another_cache_salt_get_none_of_the_kv(tmp_path, corpus):
    prompt = corpus[:700]

    def salted(salt):
        return {"prompt_token_ids": prompt} | ({"cache_salt": salt} if salt else {})

    rounds = [[salted("tenant-a")], [salted("tenant-b")], [salted(None)], [salted("tenant-a")], [salted("tenant-b")]]
    cached = run_matching_plain(tmp_path, rounds, tmp_path / "disk")
    # tenant-a stores; tenant-b and the unsalted request find nothing and store their own; tenant-a
    # and tenant-b, asked again, each load theirs
    assert cached["loaded"] == [699, 699]
    assert cached["stats"]["engine"]["stored_tokens"] == 3 * 700


def test_vllm_prefix_cache_hits_are_not_loaded_again(tmp_path, corpus):
    prompt = corpus[:1500]
    rounds = [[prompt], [prompt]]
    cached = run_matching_plain(tmp_path, rounds, tmp_path / "disk", prefix_caching=True)
    # round 2: vLLM's own prefix cache holds the 11 whole blocks (1,408 tokens); kvtier loads only
    # the rest of the prompt but its last token, into the 12th block
    assert cached["loaded"] == [91]
    assert cached["stats"]["engine"]["lookup_hit_tokens"] >= 1280


def test_chunked_prefill_and_preempted_requests(tmp_path, corpus):
    long = corpus[:1500]
    short = [corpus[2000 + i * 700 : 2000 + i * 700 + 300] for i in range(6)]
    # 512 tokens a step: `long` is prefilled in three steps. 18 blocks of 128 tokens hold the six
    # short prompts, not their 120 generated tokens as well: vLLM preempts some and resumes them later.
    flags = {"max_num_batched_tokens": 512, "num_blocks": 18, "max_model_len": 2048, "max_tokens": 120}
    cached = run_matching_plain(tmp_path, [[long], short, [long]], tmp_path / "disk", **flags)
    first = [
        (int(a), int(b)) for a, b in re.findall(r" 0-\w+: stored \d+ new tokens of \[(\d+), (\d+)\)", cached["stderr"])
    ]
    assert first == [(0, 512), (512, 1024), (1024, 1500)]  # each step stores what it completed
    assert cached["preemptions"] >= 1
    # a resumed request finds its prompt (stored before the preemption) and `long`, asked again, is
    # found whole: each is loaded but for its last prompt token
    assert cached["loaded"] == [299] * cached["preemptions"] + [1499]
