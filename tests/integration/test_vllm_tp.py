"""KVTierConnector under tensor parallelism: two vLLM CPU worker processes, each with its own shard.

The built-in model's 9 attention heads do not split over 2 ranks, so these tests use a small
random Llama (4 heads, 2 KV heads) written on the spot, with the built-in model's tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import socket
from pathlib import Path

import pytest

from tests.cluster.procs import Controller, free_port
from tests.integration.test_vllm import run, run_matching_plain

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism here needs a core per rank"),
]
TP = 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtier.models import export_default_model

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, initializer_range=0.3,  # wide enough that greedy tokens vary
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    source = export_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


def chunk_file(disk: Path, model: Path, tokens: list[int], rank: int, index: int) -> Path:
    """The disk file of one rank's chunk, found the way that rank's connector names it."""
    import torch

    from kvtier import CacheEngine, Config, KVLayout
    from kvtier.integration.vllm.setup import model_id_for

    layout = KVLayout(2, 1, 64, torch.float32)  # 2 KV heads over 2 ranks
    with CacheEngine(Config.from_dict({"disk": {"path": str(disk)}}), layout, model_id_for(str(model)),
                     rank=rank, world_size=TP) as engine:  # fmt: skip
        key = engine.chunks(tokens)[index].key
        return Path(engine.chain.lower[0]._path(key))


def free_ports(n: int) -> int:
    """The first of `n` consecutive free loopback ports."""
    for _ in range(100):
        base = free_port()
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def test_tensor_parallel_reuse_and_a_load_failing_on_one_rank(tmp_path, tiny_model):
    rng = random.Random(1)
    whole = [rng.randrange(100, 40000) for _ in range(1024)]
    shorter = whole[:1000]
    disk = tmp_path / "disk"
    flags = {"model": tiny_model, "tp": TP}
    # The first instance also runs the services (kvtier.node): each worker rank its own admin API on
    # admin.port + rank and its own cluster registration; the scheduler none (it would bind rank 0's port).
    controller = Controller()
    try:
        admin = free_ports(TP)
        services = {"admin": {"port": admin}, "cluster": {"controller_url": controller.url, "instance_id": "vllm"}}
        first = run(tmp_path, [[whole]], disk, extra=json.dumps(services), admin_ports=TP, **flags)
        instances = controller.instances()
    finally:
        controller.stop()
    health = [answer["/health"] for answer in first["admin"]]
    assert [h.get("rank") for h in health] == list(range(TP)), first["admin"]
    namespaces = [answer["/config"]["namespace"] for answer in first["admin"]]
    assert len(set(namespaces)) == TP  # each rank's API serves its own engine
    assert sorted(instances) == [f"vllm-rank{r}" for r in range(TP)]
    for rank in range(TP):
        inst = instances[f"vllm-rank{rank}"]
        assert inst["admin_url"] == f"http://127.0.0.1:{admin + rank}"
        assert inst["namespace"] == namespaces[rank]
        assert inst["chunks"]["l1"] == 4  # 1,024 tokens: 4 chunks of this rank's shard
    victim = chunk_file(disk, tiny_model, whole, rank=1, index=1)  # rank 1's tokens 256..512
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(data)
    # `shorter` finds 3 whole chunks; rank 1's load stops at its corrupt one, rank 0's succeeds. The
    # step's forward pass mixed rank 1's unfilled heads into every layer after the first, so neither
    # rank may store what it computed (the partial chunk 768..1000): both must say so.
    second = run(tmp_path, [[shorter]], disk, **flags)
    assert sorted(second["loaded"]) == [256, 768]
    assert second["stderr"].count("not storing tokens [768, 1000), computed over a failed load") == TP
    # a third instance: both prompts but their last token, on both ranks, with vLLM's tokens
    third = run_matching_plain(tmp_path, [[whole], [shorter]], disk, **flags)
    assert third["loaded"] == [1023] * TP + [999] * TP
    assert second["outputs"][0] == third["outputs"][1]


def test_tensor_parallel_memory_tier_alone(tmp_path, tiny_model):
    # no disk: the scheduler counts a chunk once both ranks' published L1 keys list their shard
    rng = random.Random(2)
    prompt = [rng.randrange(100, 40000) for _ in range(3000)]
    flags = {"model": tiny_model, "tp": TP}
    cached = run(tmp_path, [[prompt], [prompt]], memory_only=True, **flags)
    assert cached["loaded"] == [2999] * TP
    assert cached["outputs"] == run(tmp_path, [[prompt], [prompt]], **flags)["outputs"]
