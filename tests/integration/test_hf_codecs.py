"""Every codec end to end with the HF integration on the built-in model: through the disk tier and
through a remote (fs://) tier, and round trips of the model's real KV within each codec's bound."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.adapters.hf import gather_chunk, new_cache
from kvtier.codec import get_codec
from kvtier.demo import document
from kvtier.integration.hf import CachedModel
from kvtier.models import layout_of, load_default_model, model_id_of
from tests.codec.conftest import SPECS

pytestmark = pytest.mark.model
CODECS = ["raw", "fp8", "fp8-e5m2:scale=token", "kivi-2", "kivi-4", "cachegen"]
PROMPT = 300  # one whole chunk and a partial one
NEW = 8


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_default_model()


@pytest.fixture(scope="module")
def prompt(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    return tokenizer(document(), add_special_tokens=False).input_ids[:PROMPT]


@pytest.fixture(scope="module")
def prompt_kv(model_and_tokenizer, prompt):
    """The model's KV of the prompt (float32, as HF runs it on the CPU), prefilled in the same
    chunk-aligned steps as CachedModel, so it is bit-identical to what CachedModel stores."""
    model, _ = model_and_tokenizer
    cache = new_cache(model)
    with torch.inference_mode():
        for lo in range(0, PROMPT, 256):
            model(input_ids=torch.tensor([prompt[lo : lo + 256]]), past_key_values=cache, use_cache=True)
    return gather_chunk(cache, layout_of(model), 0, PROMPT)


@pytest.fixture(scope="module")
def real_kv(prompt_kv):
    """One whole chunk of real KV."""
    return prompt_kv[:, :, :256].contiguous()


@pytest.fixture(scope="module")
def exact(model_and_tokenizer, prompt):
    model, _ = model_and_tokenizer
    return CachedModel(model, None).generate(prompt, NEW).tolist()


@pytest.mark.parametrize("tier", ["disk", "remote"])
@pytest.mark.parametrize("codec", CODECS)
def test_generation_from_compressed_kv(model_and_tokenizer, prompt, prompt_kv, exact, tmp_path, codec, tier):
    """The prompt's KV goes through the tier's codec (stored by the engine's chain, as CachedModel
    stores it), then CachedModel loads it from that tier and generates."""
    model, _ = model_and_tokenizer
    settings = {"l1": {"size": 0}}  # every hit is decoded from the tier under test
    if tier == "disk":
        settings |= {"disk": {"path": str(tmp_path / "disk"), "size": "1GiB"}, "codec": codec}
    else:
        settings |= {"remote": {"url": f"fs://{tmp_path / 'remote'}", "codec": codec}}
    with CacheEngine(Config.from_dict(settings), layout_of(model), model_id_of(model)) as engine:
        engine.store(prompt, prompt_kv)
        engine.flush()
        cached = CachedModel(model, engine)
        out = cached.generate(prompt, NEW)
        assert cached.last_stats.cached_tokens == PROMPT - 1 and cached.last_stats.new_tokens == NEW
        assert out[0, :PROMPT].tolist() == prompt
        stats = engine.stats()["l2" if tier == "disk" else "remote"]
        assert stats["hits"] == 2 and stats["corrupt"] == 0 and stats["puts"] == 2
    if codec == "raw":
        assert out.tolist() == exact


@pytest.mark.parametrize("spec", SPECS)
def test_real_kv_within_bound(real_kv, spec):
    codec = get_codec(spec)
    payload = codec.encode(real_kv)
    out = codec.decode(payload, tuple(real_kv.shape), real_kv.dtype)
    assert bool(((out - real_kv).abs() <= codec.error_bound(real_kv)).all())


def test_real_kv_sizes_against_bf16(real_kv):
    bf16_bytes = real_kv.numel() * 2
    ratio = {s: bf16_bytes / len(get_codec(s).encode(real_kv)) for s in ("fp8", "kivi-2", "kivi-4", "cachegen")}
    assert ratio["kivi-2"] >= 6 and ratio["cachegen"] >= 4 and ratio["fp8"] > 1.9 and ratio["kivi-4"] > 3
