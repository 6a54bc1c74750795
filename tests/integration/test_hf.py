"""The HF integration on the built-in model: identical greedy tokens with and without kvtier."""

from __future__ import annotations

import inspect

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.adapters.hf import gather_chunk, new_cache
from kvtier.demo import document
from kvtier.errors import TokenError
from kvtier.integration.hf import CachedModel
from kvtier.models import DEFAULT_MODEL, layout_of, load_default_model, model_id_of

pytestmark = pytest.mark.model
NEW = 12


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_default_model()


@pytest.fixture
def engine(model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    config = Config.from_dict({"disk": {"path": str(tmp_path / "disk"), "size": "2GiB"}, "l1": {"size": "1GiB"}})
    with CacheEngine(config, layout_of(model), model_id_of(model)) as eng:
        yield eng


def ids_of(tokenizer, n_tokens, offset=0):
    ids = tokenizer(document(), add_special_tokens=False).input_ids
    return ids[offset : offset + n_tokens]


@pytest.mark.parametrize(
    "n_tokens",
    [40, 600, 512],  # shorter than a chunk; a partial last chunk; exactly two chunks
)
def test_greedy_tokens_identical_with_and_without_cache(model_and_tokenizer, engine, n_tokens):
    model, tokenizer = model_and_tokenizer
    ids = ids_of(tokenizer, n_tokens)
    plain = CachedModel(model, None).generate(ids, NEW)
    cached = CachedModel(model, engine)
    cold = cached.generate(ids, NEW)
    assert cached.last_stats.cached_tokens == 0 and cached.last_stats.stored_tokens == n_tokens
    warm = cached.generate(ids, NEW)
    assert cached.last_stats.cached_tokens == n_tokens - 1  # all but the last token came from the cache
    assert cached.last_stats.prefilled_tokens == 1
    assert plain.tolist() == cold.tolist() == warm.tolist()
    assert plain.shape[1] > n_tokens


def test_shared_prefix_prompt(model_and_tokenizer, engine):
    model, tokenizer = model_and_tokenizer
    first = ids_of(tokenizer, 700)
    second = first[:530] + ids_of(tokenizer, 100, offset=2000)
    cached = CachedModel(model, engine)
    cached.generate(first, NEW)
    out = cached.generate(second, NEW)
    assert cached.last_stats.cached_tokens == 512  # the two full chunks they share
    assert out.tolist() == CachedModel(model, None).generate(second, NEW).tolist()


def test_same_tokens_as_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = ids_of(tokenizer, 200)
    want = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    got = CachedModel(model, None).generate(ids, NEW)
    assert got.tolist() == want.tolist()


def test_stored_kv_equals_a_fresh_prefill(model_and_tokenizer, engine):
    model, tokenizer = model_and_tokenizer
    ids = ids_of(tokenizer, 300)
    CachedModel(model, engine).generate(ids, 1)
    stored = engine.retrieve(ids)
    cache = new_cache(model)
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        for lo in (0, 256):
            model(input_ids=torch.tensor([ids[lo : lo + 256]]), use_cache=True, **{arg: cache})
    assert torch.equal(stored, gather_chunk(cache, engine.layout, 0, 300))


def test_new_process_hits_the_disk_tier(model_and_tokenizer, engine, tmp_path):
    model, tokenizer = model_and_tokenizer
    ids = ids_of(tokenizer, 600)
    want = CachedModel(model, engine).generate(ids, NEW)
    engine.flush()
    config = engine.config
    with CacheEngine(config, layout_of(model), DEFAULT_MODEL) as fresh:
        cached = CachedModel(model, fresh)
        assert cached.generate(ids, NEW).tolist() == want.tolist()
        assert cached.last_stats.cached_tokens == 599
        assert fresh.flush(timeout=30)
        assert fresh.chain.l1.stats.objects == 3  # promoted in the background...
        assert fresh.stats()["l2"]["hits"] == 6  # ...by reading the three chunks again


def test_bad_input(model_and_tokenizer, engine):
    model, _ = model_and_tokenizer
    cached = CachedModel(model, engine)
    with pytest.raises(TokenError, match=r"token ids must be in \[0, 49152\)"):
        cached.generate([1, 2, 49152])
    with pytest.raises(TokenError, match="non-empty"):
        cached.generate([])
    with pytest.raises(ValueError, match="one sequence at a time"):
        cached.generate(torch.ones(2, 5, dtype=torch.long))
