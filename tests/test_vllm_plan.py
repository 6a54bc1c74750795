"""The vLLM connector's scheduler-side rules, without vLLM: what to load and what to store, when."""

from __future__ import annotations

import pytest

from kvtier.integration.vllm.plan import Planner

BLOCK, CHUNK = 4, 8


def planner(cached: int = 0, **kwargs) -> Planner:
    return Planner(lambda tokens, salt: min(cached, len(tokens)), BLOCK, CHUNK, **kwargs)


def test_chunk_size_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ValueError, match="chunk_size 6 is not a multiple of the engine's block size 4"):
        Planner(lambda t, s: 0, 4, 6)


@pytest.mark.parametrize(
    ("cached", "prompt", "computed", "expected", "aligned"),
    [
        (0, 20, 0, 0, 0),
        (16, 20, 0, 16, 16),
        (16, 20, 8, 8, 8),  # only what vLLM does not already have
        (20, 20, 0, 19, 16),  # the last token is always computed (aligned: 19 down to 16)
        (16, 16, 0, 15, 12),
        (3, 20, 0, 3, 0),  # less than a block
        (18, 20, 16, 2, 0),  # into the block after vLLM's own hit
        (16, 20, 16, 0, 0),
    ],
)
def test_matched_tokens(cached, prompt, computed, expected, aligned):
    assert planner(cached).matched_tokens("r", list(range(prompt)), computed) == expected
    assert planner(cached, partial_blocks=False).matched_tokens("r", list(range(prompt)), computed) == aligned


def test_load_then_store_the_rest_over_chunked_prefill():
    p = planner(cached=8)
    tokens = list(range(30))
    p.on_alloc("r", lambda: tokens, 30, num_external=8)
    step = p.schedule("r", [10, 11, 12, 13], True, num_computed=8, num_scheduled=12)
    assert [(s.start, s.end, s.block_ids) for s in step.loads] == [(0, 8, [10, 11, 12, 13])]
    assert step.loads[0].tokens == tokens  # keys are computed over the whole prompt
    assert [(s.start, s.end) for s in step.stores] == [(8, 16)]  # 20 computed: chunk 8..16 is complete
    step = p.schedule("r", [14, 15, 16, 17], False, num_computed=20, num_scheduled=10)
    assert step.loads == []
    assert [(s.start, s.end) for s in step.stores] == [(16, 30)]  # 16..24, then the partial 24..30
    assert step.stores[0].block_ids == list(range(10, 18))
    assert p.schedule("r", None, False, num_computed=30, num_scheduled=1).stores == []  # decode: not stored


def test_no_partial_chunks():
    p = planner(save_partial=False)
    p.on_alloc("r", lambda: list(range(30)), 30, 0)
    step = p.schedule("r", list(range(8)), True, 0, 30)
    assert [(s.start, s.end) for s in step.stores] == [(0, 24)]


def test_decode_tokens_are_stored_when_asked():
    tokens = list(range(10))
    p = planner(save_decode=True)
    p.on_alloc("r", lambda: tokens, 10, 0)
    assert [(s.start, s.end) for s in p.schedule("r", [0, 1, 2], True, 0, 10).stores] == [(0, 8)]
    tokens.extend(range(10, 17))  # generated
    assert [(s.start, s.end) for s in p.schedule("r", [3, 4], False, 16, 1).stores] == [(8, 16)]


def test_unknown_and_finished_requests_plan_nothing():
    p = planner()
    assert p.schedule("nobody", [1], True, 0, 4).stores == []
    p.on_alloc("r", lambda: list(range(8)), 8, 0)
    p.finished("r")
    assert p.schedule("r", [1, 2], True, 0, 8).stores == []


@pytest.mark.parametrize(("partial_blocks", "loaded"), [(True, 19), (False, 16)])
def test_what_the_lookup_found_is_not_stored_again(partial_blocks, loaded):
    tokens = list(range(20))  # chunks 0..8, 8..16 and the partial 16..20
    p = planner(cached=20, partial_blocks=partial_blocks)
    assert p.matched_tokens("r", tokens, 0) == loaded  # the last token is computed
    p.on_alloc("r", lambda: tokens, 20, num_external=loaded)
    step = p.schedule("r", [0, 1, 2, 3, 4], True, num_computed=loaded, num_scheduled=20 - loaded)
    assert [(s.start, s.end) for s in step.loads] == [(0, loaded)]
    assert step.stores == []  # the partial chunk 16..20 was found: it is in the cache already


def test_chunks_vllm_computed_itself_are_not_stored_if_the_cache_has_them():
    tokens = list(range(20))
    p = planner(cached=16)
    assert p.matched_tokens("r", tokens, 16) == 0  # vLLM's prefix cache has 0..16
    p.on_alloc("r", lambda: tokens, 20, num_external=0)
    step = p.schedule("r", [0, 1, 2, 3, 4], True, num_computed=16, num_scheduled=4)
    assert step.loads == []
    assert [(s.start, s.end) for s in step.stores] == [(16, 20)]  # only what the cache lacks


def test_a_lookup_of_a_request_that_never_ran_is_forgotten():
    p = planner(cached=16)
    p.matched_tokens("r", list(range(20)), 0)
    p.finished("r")  # aborted while waiting
    p.on_alloc("r", lambda: list(range(20)), 20, num_external=0)  # a new request under a reused id
    assert [(s.start, s.end) for s in p.schedule("r", list(range(5)), True, 0, 20).stores] == [(0, 20)]


def test_a_rollback_after_a_failed_load_stores_the_recomputed_chunks_in_a_new_generation():
    tokens = list(range(30))
    p = planner(cached=24)
    assert p.matched_tokens("r", tokens, 0) == 24
    p.on_alloc("r", lambda: tokens, 30, num_external=24)
    step = p.schedule("r", list(range(8)), True, num_computed=24, num_scheduled=6)
    assert [(s.start, s.end, s.generation) for s in step.loads] == [(0, 24, 0)]
    assert [(s.start, s.end, s.generation) for s in step.stores] == [(24, 30, 0)]
    # the load failed at token 12 (block 3): vLLM recomputes from there
    step = p.schedule("r", None, False, num_computed=12, num_scheduled=18)
    assert step.loads == []
    assert [(s.start, s.end, s.generation, s.after_rollback) for s in step.stores] == [(8, 30, 1, True)]
    assert p.schedule("r", None, False, num_computed=30, num_scheduled=1).stores == []  # decode


def test_a_resumed_request_is_not_a_rollback():
    tokens = list(range(30))
    p = planner()
    p.on_alloc("r", lambda: tokens, 30, num_external=0)
    assert [(s.start, s.end) for s in p.schedule("r", list(range(8)), True, 0, 30).stores] == [(0, 30)]
    p.on_alloc("r", lambda: tokens, 30, num_external=0)  # preempted, then scheduled again
    step = p.schedule("r", list(range(8)), True, num_computed=0, num_scheduled=30)
    assert step.stores == []  # stored before the preemption: still in the cache
    assert step.loads == []


def test_a_resumed_request_stores_in_a_new_generation():
    # a load that failed just before a preemption leaves the worker refusing the old generation;
    # vLLM's rollback is never seen (the request starts over), so resuming starts a new one
    tokens = list(range(30))
    p = planner()
    p.on_alloc("r", lambda: tokens, 30, num_external=0)
    assert [s.generation for s in p.schedule("r", list(range(8)), True, 0, 12).stores] == [0]
    p.on_alloc("r", lambda: tokens, 30, num_external=0)
    stores = p.schedule("r", list(range(8)), True, 12, 18).stores
    assert [(s.start, s.end, s.generation, s.after_rollback) for s in stores] == [(8, 30, 1, False)]  # not a rollback


def test_a_requests_salt_reaches_its_lookup_loads_and_stores():
    looked_up = []

    def lookup(tokens, salt):
        looked_up.append(salt)
        return 8

    p = Planner(lookup, BLOCK, CHUNK)
    tokens = list(range(20))
    assert p.matched_tokens("r", tokens, 0, salt="tenant-a") == 8 and looked_up == ["tenant-a"]
    p.on_alloc("r", lambda: tokens, 20, num_external=8, salt="tenant-a")
    step = p.schedule("r", list(range(5)), True, num_computed=8, num_scheduled=12)
    assert [s.salt for s in step.loads] == ["tenant-a"] and [s.salt for s in step.stores] == ["tenant-a"]
