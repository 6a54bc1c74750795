"""The vLLM connector's scheduler-side rules, without vLLM: what to load and what to store, when."""

from __future__ import annotations

import pytest

from kvtier.integration.vllm.plan import Planner

BLOCK, CHUNK = 4, 8


def planner(cached: int = 0, **kwargs) -> Planner:
    return Planner(lambda tokens: min(cached, len(tokens)), BLOCK, CHUNK, **kwargs)


def test_chunk_size_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ValueError, match="chunk_size 6 is not a multiple of the engine's block size 4"):
        Planner(lambda t: 0, 4, 6)


@pytest.mark.parametrize(
    ("cached", "prompt", "computed", "expected"),
    [
        (0, 20, 0, 0),
        (16, 20, 0, 16),
        (16, 20, 8, 8),  # only what vLLM does not already have
        (20, 20, 0, 16),  # the last token is always computed: 19, aligned down to 16
        (16, 16, 0, 12),
        (3, 20, 0, 0),  # less than a block
        (16, 20, 16, 0),
    ],
)
def test_matched_tokens(cached, prompt, computed, expected):
    assert planner(cached).matched_tokens("r", list(range(prompt)), computed) == expected


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
