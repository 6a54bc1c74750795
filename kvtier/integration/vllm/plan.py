"""Scheduler-side bookkeeping of the vLLM connector: which token ranges to load and to store.

Pure data, no tensors and no vLLM imports, so the rules are unit-testable on their own. The
scheduler asks `matched_tokens` during scheduling, `on_alloc` after blocks were allocated, and
`build` once per step; the result travels to the workers as connector metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class LoadSpec:
    """Load cached KV of tokens [start, end) of a request into its blocks."""

    req_id: str
    tokens: list[int]  # the prompt the lookup saw: its chunks (a partial last one too) name the KV
    block_ids: list[int]
    start: int
    end: int
    generation: int = 0  # the request's generation (see StoreSpec)
    salt: str | None = None  # keeps the request's KV apart (see CacheEngine.chunks)


@dataclass(slots=True)
class StoreSpec:
    """Store the KV of tokens [start, end) (start chunk-aligned) of a request from its blocks.

    `generation` counts the times vLLM rolled the request back after a failed load: a worker
    stores nothing planned in the generation of a load that failed (it was computed, or will be
    under async scheduling, over blocks that were never filled).
    """

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int
    generation: int = 0
    salt: str | None = None
    # the generation began with vLLM's rollback after a failed load, which recomputes every block
    # from the first failed one (not with a resume after a preemption, which may get such blocks
    # unfilled from vLLM's prefix cache)
    after_rollback: bool = False


@dataclass(slots=True)
class StepPlan:
    """Everything the workers do for one scheduler step."""

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    tokens: Callable[[], Sequence[int]]  # current token ids (prompt, then generated)
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    external: int = 0  # tokens to load when the request is next scheduled
    stored: int = 0  # tokens [0, stored) were stored (or found cached)
    expected: int | None = None  # tokens computed once the last scheduled step ran (None: newly allocated)
    generation: int = 0  # rollbacks seen (see StoreSpec)
    salt: str | None = None
    after_rollback: bool = False  # the generation began with a rollback (see StoreSpec)


class Planner:
    """Decides loads and stores; `lookup(tokens, salt) -> cached leading tokens` is the only dependency."""

    def __init__(
        self,
        lookup: Callable[[Sequence[int], str | None], int],
        block_size: int,
        chunk_size: int,
        save_partial: bool = True,
        save_decode: bool = False,
        partial_blocks: bool = True,
    ) -> None:
        if chunk_size % block_size:
            raise ValueError(
                f"chunk_size {chunk_size} is not a multiple of the engine's block size {block_size}; "
                f"use a multiple such as {block_size * max(1, chunk_size // block_size)}"
            )
        self.lookup = lookup
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.save_partial = save_partial
        self.save_decode = save_decode
        self.partial_blocks = partial_blocks
        self.requests: dict[str, _Request] = {}
        self._found: dict[str, int] = {}  # request -> leading prompt tokens its last lookup found cached

    def matched_tokens(self, req_id: str, tokens: Sequence[int], num_computed: int, salt: str | None = None) -> int:
        """Tokens beyond `num_computed` (vLLM's own prefix-cache hit, always block-aligned) that
        the cache can provide.

        The engine computes at least the prompt's last token itself, to sample from its logits.
        With `partial_blocks` the load ends wherever the hit does, inside a block if need be (so a
        prompt seen before computes one token); without, it ends at a block boundary, as vLLM's
        ExampleConnector does (up to block_size - 1 more tokens computed). Only remembers what the
        lookup found (the latest call wins): chunks the cache already holds are not stored again,
        neither the ones vLLM's own prefix cache covered nor a partial chunk left unloaded.
        """
        found = self.lookup(tokens, salt)
        self._found[req_id] = found
        usable = min(found, len(tokens) - 1)
        if not self.partial_blocks:
            usable -= usable % self.block_size
        return max(0, usable - num_computed)

    def on_alloc(
        self, req_id: str, tokens: Callable[[], Sequence[int]], prompt_len: int, num_external: int,
        salt: str | None = None,
    ) -> None:  # fmt: skip
        """Remember the request and how many tokens after its locally computed ones to load."""
        state = self.requests.get(req_id)
        if state is None:
            state = self.requests[req_id] = _Request(tokens, prompt_len, salt=salt)
        else:  # resumed after a preemption: a new generation (a rollback before it would go unseen)
            state.generation += 1
            state.after_rollback = False
        state.external = num_external
        state.stored = max(state.stored, self._found.pop(req_id, 0))
        state.expected = None

    def schedule(
        self, req_id: str, block_ids: list[int] | None, replace: bool, num_computed: int, num_scheduled: int
    ) -> StepPlan:
        """The loads and stores of one request scheduled in this step.

        `num_computed` counts the tokens whose KV is in the request's blocks before this step's
        forward pass (local prefix-cache hits plus tokens the connector loads); `num_scheduled`
        the tokens the step computes.
        """
        plan = StepPlan()
        state = self.requests.get(req_id)
        if state is None:
            return plan
        if block_ids is not None:
            state.block_ids = list(block_ids) if replace else state.block_ids + list(block_ids)
        tokens = state.tokens()
        if state.expected is not None and num_computed < min(state.expected, state.stored):
            # vLLM rolled the request back: a load failed and it recomputes from num_computed. The
            # steps planned before stored nothing (see StoreSpec); store the recomputed chunks, so the
            # cache heals (a corrupt chunk was deleted when it was found).
            state.stored = _floor(num_computed, self.chunk_size)
            state.generation += 1
            state.after_rollback = True
        state.expected = num_computed + num_scheduled
        if state.external:
            start, end = num_computed - state.external, num_computed
            prompt = list(tokens[: state.prompt_len])
            plan.loads.append(LoadSpec(req_id, prompt, list(state.block_ids), start, end, state.generation,
                                       state.salt))  # fmt: skip
            state.external = 0
            state.stored = max(state.stored, _floor(end, self.chunk_size))
        store = self._store_range(state, len(tokens), num_computed + num_scheduled)
        if store is not None:
            start, end = store
            plan.stores.append(StoreSpec(req_id, list(tokens[:end]), list(state.block_ids), start, end,
                                         state.generation, state.salt, state.after_rollback))  # fmt: skip
            state.stored = end
        return plan

    def _store_range(self, state: _Request, num_tokens: int, computed: int) -> tuple[int, int] | None:
        limit = min(computed, num_tokens if self.save_decode else state.prompt_len)
        end = _floor(limit, self.chunk_size)
        prompt_done = computed >= state.prompt_len
        if self.save_partial and prompt_done and not self.save_decode and limit == state.prompt_len:
            end = limit  # the prompt's trailing partial chunk
        start = _floor(state.stored, self.chunk_size)
        if end <= state.stored or end <= start:
            return None
        return start, end

    def finished(self, req_id: str) -> None:
        """Forget a finished request."""
        self.requests.pop(req_id, None)
        self._found.pop(req_id, None)


def _floor(n: int, multiple: int) -> int:
    return n - n % multiple
