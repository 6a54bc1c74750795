"""Run token prompts through a real vLLM engine, with or without KVTierConnector; print one JSON line.

Used by tests/integration/test_vllm.py, each call in its own process (like separate vLLM instances).

    python tests/integration/vllm_runner.py PROMPTS.json [--disk DIR] [--mp] [--prefix-caching] [--model DIR] [--tp N]
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", help="JSON file: a list of rounds, each a list of token-id prompts")
    parser.add_argument("--disk", help="use KVTierConnector with this disk tier directory")
    parser.add_argument("--mp", action="store_true", help="vLLM's multiprocess mode (scheduler and worker apart)")
    parser.add_argument("--prefix-caching", action="store_true", help="keep vLLM's own prefix cache on")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="model and KV dtype (default float32: see test_vllm.py)")
    parser.add_argument("--extra", default="{}", help="JSON merged into kv_connector_extra_config")
    parser.add_argument("--model", help="a local model folder (default: the built-in model)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (worker processes, a core each)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.mp else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs = {}
    if args.tp > 1:  # one core per rank (vLLM's automatic binding wants a NUMA node per rank)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(rank) for rank in range(args.tp)))
        kwargs = {"tensor_parallel_size": args.tp, "distributed_executor_backend": "mp"}

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvtier.models import export_default_model

    if args.disk:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.integration.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"disk": {"path": args.disk}, "log_level": "info", **json.loads(args.extra)},
        )
    llm = LLM(
        model=args.model or str(export_default_model()),
        max_model_len=4096,
        enable_prefix_caching=args.prefix_caching,
        enforce_eager=True,
        dtype=args.dtype,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with open(args.prompts) as f:
        rounds = json.load(f)
    outputs = []
    for prompts in rounds:
        done = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs.append([list(o.outputs[0].token_ids) for o in done])
    print("RESULT " + json.dumps({"outputs": outputs, "stats": _engine_stats()}), flush=True)


def _engine_stats() -> dict | None:
    """The in-process kvtier engine's counters (None when the worker runs in another process)."""
    from kvtier.integration.vllm import setup

    for engine in setup.engines():
        engine.flush()
        return engine.stats()
    return None


if __name__ == "__main__":
    main()
