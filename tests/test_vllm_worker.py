"""The vLLM connector's worker side on synthetic paged caches (CPU layout): store, load, load errors."""

from __future__ import annotations

import logging

import pytest
import torch

from kvtier import CacheEngine, Config, KVLayout
from kvtier.adapters.paged import PagedKV, expected_shape
from kvtier.errors import LayoutError
from kvtier.integration.vllm.plan import LoadSpec, StepPlan, StoreSpec
from kvtier.integration.vllm.worker import Worker, detect_kind, layer_order

LAYOUT = KVLayout(3, 2, 8, torch.bfloat16)
BLOCK, CHUNK = 4, 8


def caches(seed):
    gen = torch.Generator().manual_seed(seed)
    shape = expected_shape("cpu", LAYOUT, 12, BLOCK)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, generator=gen).to(LAYOUT.dtype) for i in range(3)}


def make_worker(tmp_path, seed):
    engine = CacheEngine(Config.from_dict({"chunk_size": CHUNK, "disk": {"path": str(tmp_path)}}), LAYOUT, "m")
    worker = Worker(engine, BLOCK)
    kv = caches(seed)
    worker.register(kv)
    return worker, kv


def test_store_then_load_into_other_blocks(tmp_path):
    tokens = list(range(100, 120))
    src, src_kv = make_worker(tmp_path, seed=1)
    src.save(StepPlan(stores=[StoreSpec("a", tokens, [3, 7, 1, 9, 5], 0, 20)]))
    src.engine.flush()
    dst, dst_kv = make_worker(tmp_path, seed=2)  # another process: an empty L1, the same disk
    dst.load(StepPlan(loads=[LoadSpec("b", tokens, [0, 2, 4, 6, 8], 0, 16)]))
    assert dst.take_load_errors() == set()
    want = PagedKV("cpu", LAYOUT, [src_kv[k] for k in layer_order(list(src_kv))], BLOCK)
    got = PagedKV("cpu", LAYOUT, [dst_kv[k] for k in layer_order(list(dst_kv))], BLOCK)
    assert torch.equal(got.gather(torch.tensor([0, 2, 4, 6]), 0, 16), want.gather(torch.tensor([3, 7, 1, 9]), 0, 16))
    assert dst.loaded_tokens == 16


def test_missing_chunks_are_reported_as_load_errors(tmp_path):
    tokens = list(range(100, 124))
    src, _ = make_worker(tmp_path, seed=1)
    src.save(StepPlan(stores=[StoreSpec("a", tokens, list(range(6)), 0, 24)]))
    src.engine.flush()
    second = src.engine.chunks(tokens)[1].key
    for tier in src.engine.chain.tiers:
        tier.delete(second)
    src.load(StepPlan(loads=[LoadSpec("b", tokens, [6, 7, 8, 9, 10, 11], 0, 20)]))
    assert src.take_load_errors() == {8, 9, 10}  # tokens 8..20 live in blocks 8, 9, 10
    assert src.take_load_errors() == set()


def test_a_draft_models_extra_layers_are_a_clear_error(tmp_path):
    engine = CacheEngine(Config.from_dict({"chunk_size": CHUNK}), LAYOUT, "m")
    kv = caches(0) | {"drafter.layers.0.attn": torch.zeros(expected_shape("cpu", LAYOUT, 12, BLOCK))}
    with pytest.raises(LayoutError, match=r"registered 4 KV cache layers for a model of 3: .* draft model"):
        Worker(engine, BLOCK).register(kv)
    engine.close()


def test_layer_order_and_layout_detection():
    assert layer_order(["m.layers.10.attn", "m.layers.2.attn", "m.layers.1.attn"]) == [
        "m.layers.1.attn", "m.layers.2.attn", "m.layers.10.attn",
    ]  # fmt: skip
    assert detect_kind(torch.empty(5, 2, 4, 16), 8, 4, False) == "cpu"
    assert detect_kind(torch.empty(2, 5, 4, 2, 8), 8, 4, False) == "flash_nhd"
    assert detect_kind(torch.empty(2, 5, 2, 4, 8), 8, 4, False) == "flash_hnd"
    assert detect_kind(torch.empty(5, 2, 4, 2, 8), 8, 4, False) == "flashinfer"
    assert detect_kind(torch.empty(5, 4, 576), 576, 4, True) == "mla"
    with pytest.raises(LayoutError, match="unsupported vLLM KV cache shape"):
        detect_kind(torch.empty(5, 4), 8, 4, False)


def test_nothing_computed_over_a_failed_load_is_stored(tmp_path):
    # a prompt cached up to token 16 whose second chunk vanished: its KV for 16..20, computed in the
    # step of the failed load, attended to blocks that were never filled, and must not be stored
    tokens = list(range(100, 120))
    worker, _ = make_worker(tmp_path, seed=1)
    worker.save(StepPlan(stores=[StoreSpec("a", tokens[:16], list(range(4)), 0, 16)]))
    worker.engine.flush()
    for tier in worker.engine.chain.tiers:
        tier.delete(worker.engine.chunks(tokens)[1].key)
    step = StepPlan(loads=[LoadSpec("b", tokens, [4, 5, 6, 7, 8], 0, 16)],
                    stores=[StoreSpec("b", tokens, [4, 5, 6, 7, 8], 16, 20)])  # fmt: skip
    partial = worker.engine.chunks(tokens)[2].key

    def cached(key):
        worker.engine.flush()
        return any(tier.contains(key) for tier in worker.engine.chain.tiers)

    worker.load(step)
    worker.save(step)
    assert worker.take_load_errors() == {6, 7}
    assert not cached(partial)
    worker.save(StepPlan(stores=[StoreSpec("b", tokens, [4, 5, 6, 7, 8], 16, 20)]))  # a later step, same generation
    assert not cached(partial)
    # vLLM rolled back and recomputed: the next generation's stores heal the cache
    recompute = StoreSpec("b", tokens, [4, 5, 6, 7, 8], 8, 20, generation=1, after_rollback=True)
    worker.save(StepPlan(stores=[recompute]))
    assert worker.engine.lookup(tokens) == 20
    assert worker.stored_tokens == 16 + 12


def test_a_load_that_failed_on_another_tensor_parallel_rank_stops_this_ranks_stores(tmp_path):
    tokens = list(range(100, 124))
    worker, _ = make_worker(tmp_path, seed=1)
    worker.save(StepPlan(stores=[StoreSpec("a", tokens[:16], list(range(4)), 0, 16)]))
    seen = []

    def other_rank_failed_b(flags):  # what an all-reduce (max) over the TP group gives
        seen.append(flags.tolist())
        flags[1] = 1

    worker.agree = other_rank_failed_b
    a, b = [4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 10, 11]  # the two requests' blocks
    step = StepPlan(loads=[LoadSpec("a", tokens, a, 0, 16), LoadSpec("b", tokens, b, 0, 16)],
                    stores=[StoreSpec("a", tokens, a, 16, 24), StoreSpec("b", tokens, b, 16, 24)])  # fmt: skip
    worker.load(step)
    assert seen == [[0, 0]]  # this rank loaded both in full
    assert worker.take_load_errors() == set()  # its blocks are fine; the other rank reports its own
    worker.save(step)
    assert worker.stored_tokens == 16 + 8  # "a" stored its chunk 16..24; "b" did not
    worker.load(StepPlan())  # a step without loads: no collective
    assert len(seen) == 1


def test_ranks_that_cannot_agree_store_nothing_of_the_steps_loads(tmp_path):
    tokens = list(range(100, 124))
    worker, _ = make_worker(tmp_path, seed=1)
    worker.save(StepPlan(stores=[StoreSpec("a", tokens[:16], list(range(4)), 0, 16)]))

    def broken(flags):
        raise RuntimeError("connection reset by peer")

    worker.agree = broken
    step = StepPlan(loads=[LoadSpec("b", tokens, [4, 5, 6, 7, 8, 9], 0, 16)],
                    stores=[StoreSpec("b", tokens, [4, 5, 6, 7, 8, 9], 16, 24)])  # fmt: skip
    worker.load(step)  # does not raise into vLLM
    worker.save(step)
    assert worker.loaded_tokens == 16 and worker.stored_tokens == 16  # only the first store


def test_requests_sharing_the_blocks_of_a_failed_load_store_nothing_computed_over_them(tmp_path):
    tokens = list(range(100, 124))
    other = tokens[:16] + list(range(500, 508))  # shares 16 tokens (blocks 4..7) with `tokens`
    worker, _ = make_worker(tmp_path, seed=1)
    worker.save(StepPlan(stores=[StoreSpec("seed", tokens[:16], list(range(4)), 0, 16)]))
    for tier in worker.engine.chain.tiers:
        tier.delete(worker.engine.chunks(tokens)[1].key)
    a, b = [4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 10, 11]  # b got a's first 4 blocks from vLLM's prefix cache
    step = StepPlan(loads=[LoadSpec("a", tokens, a, 0, 16)],
                    stores=[StoreSpec("b", other, b, 16, 24)])  # fmt: skip
    worker.load(step)
    worker.save(step)  # b attended to blocks 6, 7 that a's load never filled
    later = StepPlan(stores=[StoreSpec("c", other, b, 16, 24)])  # planned a step ahead (async scheduling)
    worker.load(later)
    worker.save(later)
    assert worker.stored_tokens == 16  # neither b nor c stored
    # vLLM rolled b back too: it recomputed from its first failed block, the shared ones included
    worker.save(StepPlan(stores=[StoreSpec("b", other, b, 8, 24, generation=1, after_rollback=True)]))
    assert worker.stored_tokens == 16 + 16
    after = StepPlan(stores=[StoreSpec("d", tokens, a, 16, 24)])
    worker.load(after)  # two steps later: the failed load's blocks were recomputed
    worker.save(after)
    assert worker.stored_tokens == 16 + 16 + 8


def test_a_request_resumed_over_a_failed_load_stores_nothing_computed_over_it(tmp_path):
    tokens = list(range(100, 124))
    worker, _ = make_worker(tmp_path, seed=1)
    worker.save(StepPlan(stores=[StoreSpec("seed", tokens[:16], list(range(4)), 0, 16)]))
    for tier in worker.engine.chain.tiers:
        tier.delete(worker.engine.chunks(tokens)[1].key)
    a = [4, 5, 6, 7, 8, 9]
    worker.load(StepPlan(loads=[LoadSpec("a", tokens, a, 0, 16)]))  # fails at block 6
    # a is preempted before its recompute and resumed (a new generation, not a rollback): vLLM's
    # prefix cache hands it its blocks back, 6 and 7 still unfilled
    step = StepPlan(stores=[StoreSpec("a", tokens, a, 16, 24, generation=1)])
    worker.load(step)
    worker.save(step)
    assert worker.stored_tokens == 16
    # a rollback instead: a recomputed from block 6, and its stores are kept
    worker.save(StepPlan(stores=[StoreSpec("a", tokens, a, 8, 24, generation=2, after_rollback=True)]))
    assert worker.stored_tokens == 16 + 16


def test_finished_requests_are_forgotten(tmp_path):
    tokens = list(range(100, 124))
    worker, _ = make_worker(tmp_path, seed=1)
    worker.load(StepPlan(loads=[LoadSpec("a", tokens, [0, 1, 2, 3, 4, 5], 0, 16)]))  # nothing cached: fails
    worker.forget({"a"})
    worker.load(StepPlan())
    worker.load(StepPlan())  # its blocks are no longer tainted either
    worker.save(StepPlan(stores=[StoreSpec("a", tokens, [0, 1, 2, 3, 4, 5], 0, 24)]))  # a reused id
    assert worker.stored_tokens == 24


def test_stores_are_logged_with_what_they_added(tmp_path, caplog):
    tokens = list(range(100, 124))
    worker, _ = make_worker(tmp_path, seed=1)
    with caplog.at_level(logging.INFO, logger="kvtier.vllm.worker"):
        worker.save(StepPlan(stores=[StoreSpec("a", tokens, [0, 1, 2, 3, 4, 5], 0, 24)]))
        worker.save(StepPlan(stores=[StoreSpec("b", tokens, [0, 1, 2, 3, 4, 5], 0, 24)]))  # all in L1 already
    stored = [r.getMessage() for r in caplog.records if "stored" in r.getMessage()]
    assert stored == ["a: stored 24 new tokens of [0, 24)"]


def _written_by_vllm(isa: str, layout: KVLayout, block_size: int, blocks: int, slots, want) -> list[torch.Tensor]:
    """Per-layer CPU caches holding canonical `want` at `slots`, written by vLLM's `isa` kernel op."""
    from vllm import _custom_ops as ops

    caches = [torch.zeros(expected_shape("cpu", layout, blocks, block_size), dtype=layout.dtype) for _ in range(2)]
    for layer, cache in enumerate(caches):  # what vLLM's forward pass writes
        key_cache, value_cache = cache.view(blocks, layout.num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(want[0, layer].clone(), want[1, layer].clone(), key_cache, value_cache,
                                       slots, isa)  # fmt: skip
    return caches


# Every x86 kernel of vLLM's CPU backend, in every dtype it takes. The op that writes the cache only
# moves data, so it runs with the `amx` kernel on CPUs without AMX too (this one: AMD EPYC).
KERNELS = [(isa, dtype) for isa in ("vec", "amx") for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize(("isa", "dtype"), [*KERNELS, ("vec16", torch.bfloat16), ("vec16", torch.float32)])
def test_cpu_layout_reads_what_each_vllm_kernel_writes(isa, dtype):
    pytest.importorskip("vllm")
    from kvtier.integration.vllm.cpu_check import cpu_block_orders

    block_size = 16 if isa == "vec16" else 64
    layout = KVLayout(2, 3, 64, dtype)
    slots = torch.tensor([3 * block_size + 5, 1 * block_size, 1 * block_size + 1])  # scattered, in no order
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(layout.shape(3), generator=gen).to(dtype)  # canonical [2, layers, tokens, heads, dim]
    caches = _written_by_vllm(isa, layout, block_size, 4, slots, want)
    paged = PagedKV("cpu", layout, caches, block_size, cpu_block_orders(layout, block_size, isa=isa))
    full = paged.gather(torch.tensor([3, 1]), 0, 2 * block_size)  # tokens 5 of block 3, then 0 and 1 of block 1
    assert torch.equal(full[:, :, 5], want[:, :, 0])
    assert torch.equal(full[:, :, block_size : block_size + 2], want[:, :, 1:])


def test_amx_orders_are_vnni_pairs_and_vec_orders_columns_and_rows():
    pytest.importorskip("vllm")
    from kvtier.adapters.paged import BlockOrder, vec_orders
    from kvtier.integration.vllm.cpu_check import learn_orders

    layout = KVLayout(1, 2, 64, torch.bfloat16)
    k, v = learn_orders("amx", layout, 32, torch.bfloat16, "auto")
    # AMX tiles with VNNI pairs: K as [block_size / 16, head_dim / 2, 16 tokens, 2 dims],
    # V as [head_dim / 16, block_size / 2, 16 dims, 2 tokens]
    assert k == BlockOrder(16, 2, t_hi=1024, t_step=2, d_hi=32, d_step=1)
    assert v == BlockOrder(2, 16, t_hi=32, t_step=1, d_hi=512, d_step=2)
    assert learn_orders("vec", layout, 32, torch.bfloat16, "auto") == vec_orders(32, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_chunk_stored_from_an_amx_instance_loads_into_a_vec_instance_and_transformers(tmp_path, dtype):
    pytest.importorskip("vllm")
    from kvtier.integration.vllm.cpu_check import cpu_block_orders

    block_size, n = 32, 70  # two whole blocks and a partial third
    layout = KVLayout(2, 2, 64, dtype)
    gen = torch.Generator().manual_seed(1)
    want = torch.randn(layout.shape(n), generator=gen).to(dtype)
    amx = _written_by_vllm("amx", layout, block_size, 3, torch.arange(n), want)
    config = Config.from_dict({"chunk_size": 32, "disk": {"path": str(tmp_path)}})
    tokens = list(range(n))
    with CacheEngine(config, layout, "m") as engine:  # the AMX instance stores
        paged = PagedKV("cpu", layout, amx, block_size, cpu_block_orders(layout, block_size, isa="amx"))
        engine.store_chunks(tokens, lambda lo, hi: paged.gather(torch.tensor([0, 1, 2]), 0, n)[:, :, lo:hi])
    with CacheEngine(config, layout, "m") as engine:  # a vec instance loads, from disk
        caches = [torch.zeros_like(c) for c in amx]
        vec = PagedKV("cpu", layout, caches, block_size, cpu_block_orders(layout, block_size, isa="vec"))
        ids = torch.tensor([2, 0, 1])
        assert engine.retrieve_into(tokens, lambda lo, hi, kv: vec.scatter(ids, lo, kv)) == n
        direct = _written_by_vllm(
            "vec",
            layout,
            block_size,
            3,
            torch.tensor(
                [2 * block_size + i for i in range(32)] + list(range(32)) + [block_size + i for i in range(6)]
            ),
            want,
        )
        for got, expected in zip(caches, direct, strict=True):
            assert torch.equal(got, expected)  # what vLLM's vec kernel itself writes for these tokens
        assert torch.equal(engine.retrieve(tokens), want)  # the canonical chunks transformers loads


def _fp8_kv_on_this_cpu() -> bool:
    """vLLM's CPU backend keeps fp8 KV caches only on x86 with AVX-512 or AMX."""
    return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


@pytest.mark.skipif(not _fp8_kv_on_this_cpu(), reason="vLLM's CPU fp8 KV cache needs AVX-512 or AMX")
@pytest.mark.parametrize(("cache_dtype", "dtype"), [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_caches_are_read_as_vllm_writes_them(tmp_path, caplog, cache_dtype, dtype):
    pytest.importorskip("vllm")
    layout = KVLayout(3, 2, 64, dtype)
    from kvtier.integration.vllm.cpu_check import cpu_block_orders

    with caplog.at_level(logging.DEBUG, logger="kvtier.vllm"):
        cpu_block_orders(layout, 32, torch.float32, cache_dtype)  # learned through vLLM's quantizing op
    assert "keeps K as" in caplog.text and "could not learn" not in caplog.text
    # vLLM allocates fp8 caches as bytes: the worker reads them as the layout's dtype
    engine = CacheEngine(Config.from_dict({"chunk_size": 64, "disk": {"path": str(tmp_path)}}), layout, "m")
    worker = Worker(engine, 32, model_dtype=torch.float32, cache_dtype=cache_dtype)
    gen = torch.Generator().manual_seed(0)
    shape = expected_shape("cpu", layout, 6, 32)
    raw = {f"layers.{i}.attn": torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) for i in range(3)}
    worker.register(raw)
    tokens = list(range(100))
    worker.save(StepPlan(stores=[StoreSpec("a", tokens, [0, 1, 2, 3], 0, 100)]))
    engine.flush()
    target = {name: torch.zeros_like(cache) for name, cache in raw.items()}
    worker.register(target)
    worker.load(StepPlan(loads=[LoadSpec("b", tokens, [5, 4, 3, 2], 0, 99)]))
    assert worker.take_load_errors() == set()
    for name in raw:  # bytes equal: every block whole, the last one up to token 99
        for src, dst in [(0, 5), (1, 4), (2, 3)]:
            assert torch.equal(target[name][dst], raw[name][src])
        assert torch.equal(_tokens_of(target[name][2], 3), _tokens_of(raw[name][3], 3))
    engine.close()


def _tokens_of(block: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` tokens of one CPU-layout block, K (columns) and V (rows): [heads, n, 2, dim]."""
    heads, size, two_dim = block.shape
    k = block.reshape(heads, 2 * size, two_dim // 2)[:, :size].reshape(heads, two_dim // 2, size)[:, :, :n]
    v = block.reshape(heads, 2 * size, two_dim // 2)[:, size : size + n]
    return torch.stack([k.transpose(1, 2), v], dim=2)


def test_an_order_that_is_no_strided_view_is_refused():
    from kvtier.adapters.paged import BlockOrder
    from kvtier.integration.vllm.cpu_check import fit_order

    k_columns = BlockOrder.columns(32, 64)
    assert fit_order(k_columns.offsets(32, 64)) == k_columns
    shuffled = torch.randperm(32 * 64, generator=torch.Generator().manual_seed(0)).view(32, 64)
    assert fit_order(shuffled) is None


def test_the_worker_refuses_a_kernel_it_cannot_read(monkeypatch):
    pytest.importorskip("vllm")
    from kvtier.integration.vllm import cpu_check

    monkeypatch.setattr(cpu_check, "fit_order", lambda table: None)
    with pytest.raises(LayoutError, match="in an order that is not a strided view; kvtier cannot run with it"):
        cpu_check.cpu_block_orders(KVLayout(2, 3, 64, torch.float32), 128)


def test_which_requests_are_cached_and_under_which_salt():
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from kvtier.integration.vllm.connector import keyed_by_tokens, request_salt

    plain = {"mm_features": [], "lora_request": None, "prompt_embeds": None, "cache_salt": None}
    assert keyed_by_tokens(SimpleNamespace(**plain)) and request_salt(SimpleNamespace(**plain)) is None
    assert keyed_by_tokens(SimpleNamespace()) and request_salt(SimpleNamespace()) is None  # a vLLM without them
    for name, value in [("mm_features", [object()]), ("prompt_embeds", torch.zeros(0))]:
        assert not keyed_by_tokens(SimpleNamespace(**(plain | {name: value}))), name
    lora = SimpleNamespace(lora_name="sql", lora_path="/adapters/sql")
    salts = [
        request_salt(SimpleNamespace(**(plain | change)))
        for change in [
            {"cache_salt": "tenant-a"}, {"cache_salt": "tenant-b"}, {"lora_request": lora},
            {"lora_request": SimpleNamespace(lora_name="sql", lora_path="/adapters/sql-v2")},
            {"lora_request": lora, "cache_salt": "tenant-a"},
        ]
    ]  # fmt: skip
    assert len(set(salts)) == 5 and None not in salts
    assert keyed_by_tokens(SimpleNamespace(**(plain | {"lora_request": lora, "cache_salt": "t"})))  # cached, salted


def test_pipeline_parallelism_is_refused_with_a_clear_error():
    from types import SimpleNamespace

    from kvtier.errors import ConfigError
    from kvtier.integration.vllm.setup import settings_from

    config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}),
        model_config=SimpleNamespace(),
        parallel_config=SimpleNamespace(pipeline_parallel_size=2, tensor_parallel_size=1),
    )
    with pytest.raises(ConfigError, match="does not support pipeline parallelism"):
        settings_from(config)


def test_connector_options_must_be_booleans():
    from types import SimpleNamespace

    from kvtier.errors import ConfigError
    from kvtier.integration.vllm.setup import settings_from

    extra = {"load_partial_blocks": "no"}  # a string, not a JSON boolean
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))
    with pytest.raises(ConfigError, match="load_partial_blocks must be true or false, got 'no'"):
        settings_from(config)


def test_an_unsupported_kv_cache_dtype_is_a_clear_start_up_error():
    from types import SimpleNamespace

    from kvtier.errors import ConfigError
    from kvtier.integration.vllm.setup import settings_from

    config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}),
        model_config=SimpleNamespace(dtype=torch.bfloat16),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="nvfp4"),
    )
    with pytest.raises(ConfigError, match="does not support vLLM's kv_cache_dtype 'nvfp4'; supported: auto, fp8"):
        settings_from(config)
