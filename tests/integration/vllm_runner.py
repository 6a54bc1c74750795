"""Run token prompts through a real vLLM engine, with or without KVTierConnector; print one JSON line.

Used by tests/integration/test_vllm.py, each call in its own process (like separate vLLM instances).

    python tests/integration/vllm_runner.py PROMPTS.json [--disk DIR | --memory-only] [--mp] [--prefix-caching]
        [--model DIR] [--tp N] [--max-num-batched-tokens N] [--num-blocks N] [--max-model-len N] [--kv-cache-dtype fp8]
        [--admin-ports N]
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", help="JSON file: a list of rounds, each a list of prompts (token-id lists, or "
                        "objects such as {\"prompt_token_ids\": [...], \"cache_salt\": \"a\"})")  # fmt: skip
    parser.add_argument("--disk", help="use KVTierConnector with this disk tier directory")
    parser.add_argument("--memory-only", action="store_true",
                        help="use KVTierConnector with its default configuration: the memory tier alone")  # fmt: skip
    parser.add_argument("--mp", action="store_true", help="vLLM's multiprocess mode (scheduler and worker apart)")
    parser.add_argument("--prefix-caching", action="store_true", help="keep vLLM's own prefix cache on")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="model and KV dtype (default float32: see test_vllm.py)")
    parser.add_argument("--extra", default="{}", help="JSON merged into kv_connector_extra_config")
    parser.add_argument("--model", help="a local model folder (default: the built-in model)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (worker processes, a core each)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (longer prompts: chunked prefill)")
    parser.add_argument("--num-blocks", type=int, help="KV cache blocks (few: vLLM preempts requests)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="vLLM's kv_cache_dtype (auto, fp8, fp8_e5m2, ...)")
    parser.add_argument("--admin-ports", type=int, default=0,
                        help="before exiting, report /health and /config of the admin APIs on the N ports from "
                        "admin.port on (set admin.port with --extra)")  # fmt: skip
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.mp else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs: dict = {}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.num_blocks:
        kwargs["num_gpu_blocks_override"] = args.num_blocks
    if args.tp > 1:  # one core per rank (vLLM's automatic binding wants a NUMA node per rank)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(rank) for rank in range(args.tp)))
        kwargs.update(tensor_parallel_size=args.tp, distributed_executor_backend="mp")

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvtier.models import export_default_model

    if args.disk or args.memory_only:
        disk = {"disk": {"path": args.disk}} if args.disk else {}
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integration.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={**disk, "log_level": "info", **json.loads(args.extra)},
        )
    llm = LLM(
        model=args.model or str(export_default_model()),
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.prefix_caching,
        enforce_eager=True,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=0,
        disable_log_stats=False,  # for the preemption count
        **kwargs,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with open(args.prompts) as f:
        rounds = json.load(f)
    outputs = []
    for prompts in rounds:
        done = llm.generate([p if isinstance(p, dict) else {"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)  # fmt: skip
        outputs.append([list(o.outputs[0].token_ids) for o in done])
    result = {"outputs": outputs, "stats": _engine_stats(), "preemptions": _preemptions(llm)}
    if args.admin_ports:
        base = json.loads(args.extra)["admin"]["port"]
        result["admin"] = [_admin(base + i) for i in range(args.admin_ports)]
    print("RESULT " + json.dumps(result), flush=True)


def _admin(port: int) -> dict:
    """/health and /config of the admin API on `port`, or the error of asking."""
    import urllib.request

    answer = {}
    for path in ("/health", "/config"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                answer[path] = json.loads(r.read())
        except OSError as exc:
            answer[path] = {"error": repr(exc)}
    return answer


def _preemptions(llm) -> int:
    """How often vLLM preempted a running request (to free KV blocks for others)."""
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def _engine_stats() -> dict | None:
    """The in-process kvtier engine's counters (None when the worker runs in another process)."""
    from kvtier.integration.vllm import setup

    for engine in setup.engines():
        engine.flush()
        return engine.stats()
    return None


if __name__ == "__main__":
    main()
