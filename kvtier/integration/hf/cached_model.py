"""CachedModel: greedy generation that reuses the longest cached prefix and stores new chunks.

Prefill runs in steps whose boundaries sit at multiples of the chunk size, so a request that starts
from cached KV computes every later token exactly as an uncached request of the same prompt does.
"""

from __future__ import annotations

import inspect
import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from kvtier.adapters.hf import gather_chunk, load_prefix, new_cache
from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.errors import TokenError
from kvtier.models import layout_of, model_id_of
from kvtier.node import Node

PROGRESS_MIN_TOKENS = 2048  # prefills at least this long show a progress bar (when enabled)


@dataclass(slots=True)
class GenerationStats:
    """What the last generate() call did."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens loaded from kvtier instead of computed
    prefilled_tokens: int = 0  # prompt tokens computed
    stored_tokens: int = 0  # prompt tokens newly stored in kvtier
    new_tokens: int = 0
    retrieve_s: float = 0.0  # lookup + retrieve + building the model's cache
    ttft_s: float = 0.0  # from the call to the first generated token
    total_s: float = 0.0


class CachedModel:
    """Wraps a transformers causal LM; `generate` reuses KV from `engine` and stores new KV into it."""

    def __init__(
        self, model: Any, engine: CacheEngine | None, *, prefill_step: int | None = None, progress: bool = False
    ) -> None:
        self.model = model
        self.engine = engine
        self.layout = engine.layout if engine is not None else layout_of(model)
        self.prefill_step = prefill_step or (engine.config.chunk_size if engine is not None else 256)
        self.progress = progress
        self.last_stats = GenerationStats()
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._logits_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
        self._vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        self.node: Node | None = None  # the node `open` built (closed by `close`)

    @classmethod
    def open(cls, model: Any, config: Config | None = None, model_id: str | None = None, **options: Any) -> CachedModel:
        """A CachedModel over a Node built for `model` from `config` (default `Config.load()`): its
        engine, and the admin API or cluster membership the config asks for. `close()` stops them."""
        node = Node(config or Config.load(), layout_of(model), model_id_of(model, model_id))
        try:
            cached = cls(model, node.engine, **options)
        except BaseException:
            node.close()
            raise
        cached.node = node
        return cached

    def close(self) -> None:
        """Close the node that `open` built (flushing pending stores); nothing for a given engine."""
        if self.node is not None:
            self.node.close()

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        *,
        eos_token_id: int | list[int] | None = None,
        use_cache: bool = True,
        store: bool = True,
    ) -> torch.Tensor:
        """Greedy-decode up to `max_new_tokens` after `input_ids`; return prompt + new ids as [1, n]."""
        tokens = self._prompt(input_ids)
        stats = GenerationStats(prompt_tokens=len(tokens))
        start = time.perf_counter()
        cache, cached = self._load(tokens) if use_cache and self.engine is not None else (new_cache(self.model), 0)
        stats.cached_tokens, stats.retrieve_s = cached, time.perf_counter() - start
        logits = self._prefill(tokens, cache, cached)
        stats.prefilled_tokens = len(tokens) - cached
        next_id = int(logits[0, -1].argmax())
        stats.ttft_s = time.perf_counter() - start
        if store and self.engine is not None:
            stats.stored_tokens = self._store(tokens, cache, cached)
        out = self._decode(tokens, cache, next_id, max_new_tokens, _eos_set(eos_token_id, self.model))
        stats.new_tokens = len(out) - len(tokens)
        stats.total_s = time.perf_counter() - start
        self.last_stats = stats
        return torch.tensor([out], dtype=torch.long)

    def _prompt(self, input_ids: Any) -> list[int]:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"CachedModel.generate handles one sequence at a time, got a batch of {ids.shape[0]}")
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise TokenError(f"input_ids must be a non-empty sequence of token ids, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TokenError(f"input_ids must be integers, got {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (self._vocab and high >= self._vocab):
            raise TokenError(f"token ids must be in [0, {self._vocab}), got range [{low}, {high}]")
        return ids.tolist()

    def _load(self, tokens: list[int]) -> tuple[Any, int]:
        assert self.engine is not None
        usable = min(self.engine.lookup(tokens), len(tokens) - 1)  # the last token is always computed
        if usable <= 0:
            return new_cache(self.model), 0
        return load_prefix(self.model, self.engine, tokens, usable)

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        if self._logits_arg:
            kwargs[self._logits_arg] = 1
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        return self.model(input_ids=x, **kwargs).logits

    def _prefill(self, tokens: list[int], cache: Any, pos: int) -> torch.Tensor:
        step = self.prefill_step
        bounds = [pos, *range((pos // step + 1) * step, len(tokens), step), len(tokens)]
        bar = tqdm(
            total=len(tokens) - pos, desc="prefill", unit="tok", leave=False,
            disable=not self.progress or len(tokens) - pos < PROGRESS_MIN_TOKENS,
        )  # fmt: skip
        logits = torch.empty(0)
        with bar:
            for lo, hi in itertools.pairwise(bounds):
                logits = self._forward(tokens[lo:hi], cache)
                bar.update(hi - lo)
        return logits

    def _store(self, tokens: list[int], cache: Any, cached: int) -> int:
        assert self.engine is not None
        first = cached - cached % self.engine.config.chunk_size
        return self.engine.store_chunks(tokens, lambda lo, hi: gather_chunk(cache, self.layout, lo, hi), first)

    def _decode(self, tokens: list[int], cache: Any, next_id: int, max_new: int, eos: set[int]) -> list[int]:
        out = list(tokens)
        for i in range(max_new):
            out.append(next_id)
            if next_id in eos or i == max_new - 1:
                break
            next_id = int(self._forward([next_id], cache)[0, -1].argmax())
        return out


def _eos_set(eos_token_id: int | list[int] | None, model: Any) -> set[int]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None) or model.config
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
