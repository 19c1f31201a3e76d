"""Continuous batching with chunked prefill.

Each step: every running sequence that has finished its prompt decodes one
token; prompts still being read get the rest of the step's token budget, in
arrival order; waiting requests join, in arrival order, while the budget, the
batch size and the KV cache allow. A request reserves the cache blocks for its
whole life when it joins, so a running sequence never has to be preempted. With the prefix
cache, a request joins holding the cached blocks its prompt starts with (shared, not copied),
counts only the blocks it still needs against the free ones, and prefills the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.kv_cache import BlockAllocator, blocks_for
from expertmesh.engine.prefix_cache import BlockHash, chain_hashes, reusable_blocks
from expertmesh.engine.sequence import Sequence, SequenceStatus


@dataclass
class StepPlan:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    admitted: list[Sequence] = field(default_factory=list)  # waiting sequences that join this step
    # decoding sequences that verify proposed tokens: their last token and the proposals, in one span
    verifies: list[tuple[Sequence, list[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        verified = sum(1 + len(proposals) for _, proposals in self.verifies)
        return len(self.decodes) + sum(n for _, n in self.prefills) + verified

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills and not self.verifies


@dataclass(frozen=True)
class CacheView:
    """What plan_step needs to know of the prefix cache; the default is no cache."""

    # prompt tokens of a waiting sequence the cache holds (not prefilled)
    cached_tokens: Callable[[Sequence], int] = lambda seq: 0
    # addresses of a waiting sequence's full prompt blocks past its cached ones
    uncached_blocks: Callable[[Sequence], list[BlockHash]] = lambda seq: []
    # addresses of the prompt blocks running sequences have still to compute
    in_flight: frozenset[BlockHash] = frozenset()


def plan_step(
    running: list[Sequence],
    waiting: Iterable[Sequence],
    free_blocks: int,
    config: EngineConfig,
    blocks_needed: Callable[[Sequence], int],
    cache: CacheView = CacheView(),  # noqa: B008  # frozen, never changed
) -> StepPlan:
    """Pure: what runs this step, given the queues and the free cache blocks.

    `blocks_needed(seq)` is what admitting a waiting sequence takes from the free blocks. A
    waiting sequence whose next uncached block an earlier request is computing right now waits
    a step, then shares it: admitted at once, it would compute the same K/V again (a batch of
    requests with one long shared prefix would prefill it once per seat of the first step).
    """
    plan = StepPlan()
    budget = config.max_num_batched_tokens
    plan.decodes = [s for s in running if not s.is_prefilling]
    budget -= len(plan.decodes)
    for seq in running:
        if seq.is_prefilling and budget > 0:
            n = min(len(seq.prompt_token_ids) - seq.num_computed_tokens, budget)
            plan.prefills.append((seq, n))
            budget -= n
    seats = config.max_num_seqs - len(running)
    computing = set(cache.in_flight)
    for seq in waiting:
        need = blocks_needed(seq)
        if budget <= 0 or seats <= 0 or need > free_blocks:
            break  # first come, first served: nobody overtakes the head of the queue
        uncached = cache.uncached_blocks(seq)
        if uncached and uncached[0] in computing:
            break  # ... nor a request that waits to share what is being computed
        computing.update(uncached)
        n = min(len(seq.prompt_token_ids) - cache.cached_tokens(seq), budget)
        plan.admitted.append(seq)
        plan.prefills.append((seq, n))
        budget, seats, free_blocks = budget - n, seats - 1, free_blocks - need
    return plan


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        allocator: BlockAllocator,
        max_model_len: int,
        cache_root: BlockHash | None = None,
    ):
        """`cache_root`: the root of block addresses when the allocator has a prefix cache."""
        self.config, self.allocator, self.max_model_len = config, allocator, max_model_len
        self.prefix_cache, self.cache_root = allocator.prefix_cache, cache_root
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # prompt tokens admitted, and how many of them the prefix cache held (vLLM's queries/hits)
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks for the prompt and every token the request may still generate."""
        total = min(len(seq.prompt_token_ids) + seq.params.max_tokens, self.max_model_len)
        return blocks_for(total, self.config.block_size)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:
            seq.block_hashes = self._hashes_from(self.cache_root, seq.prompt_token_ids)
        self.waiting.append(seq)

    def _hashes_from(self, parent: BlockHash | None, token_ids: list[int]) -> list[BlockHash]:
        assert parent is not None
        return chain_hashes(parent, token_ids, self.config.block_size)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting sequence's prompt may start from."""
        if self.prefix_cache is None:
            return []
        usable = reusable_blocks(len(seq.prompt_token_ids), self.config.block_size)
        return self.prefix_cache.longest_prefix(seq.block_hashes[:usable])

    def _admission_cost(self, seq: Sequence, cached: list[int]) -> int:
        """Free blocks admitting `seq` uses up: its new blocks, and the idle cached ones it takes."""
        idle = sum(1 for block in cached if self.allocator.refs(block) == 0)
        return self.blocks_needed(seq) - len(cached) + idle

    def schedule(self) -> StepPlan:
        prefixes: dict[str, list[int]] = {}  # looked up once per step and sequence

        def cached(seq: Sequence) -> list[int]:
            if seq.request_id not in prefixes:
                prefixes[seq.request_id] = self._cached_prefix(seq)
            return prefixes[seq.request_id]

        view = CacheView()
        if self.prefix_cache is not None:
            in_flight = frozenset(
                h
                for seq in self.running
                if seq.is_prefilling
                for h in seq.block_hashes[seq.num_cached_blocks :]
            )
            view = CacheView(
                cached_tokens=lambda seq: len(cached(seq)) * self.config.block_size,
                uncached_blocks=lambda seq: seq.block_hashes[len(cached(seq)) :],
                in_flight=in_flight,
            )
        plan = plan_step(
            self.running,
            self.waiting,
            self.allocator.num_free,
            self.config,
            lambda seq: self._admission_cost(seq, cached(seq)),
            view,
        )
        # every admitted sequence holds its cached blocks before any new block is allocated,
        # which could otherwise evict a block another admitted sequence counted on
        for seq in plan.admitted:
            self.waiting.popleft()
            seq.blocks = list(cached(seq))
            self.allocator.share(seq.blocks)
            seq.num_computed_tokens = seq.num_cached_tokens = len(seq.blocks) * self.config.block_size
            seq.num_cached_blocks = len(seq.blocks)
            if self.prefix_cache is not None:
                self.prefix_cache_queries += len(seq.prompt_token_ids)
                self.prefix_cache_hits += seq.num_cached_tokens
        for seq in plan.admitted:
            seq.blocks += self.allocator.allocate(self.blocks_needed(seq) - len(seq.blocks))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return plan

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Address the blocks of `seq` that are now full of computed K/V (prompt or output), so
        later requests with the same start reuse them."""
        if self.prefix_cache is None:
            return
        block_size = self.config.block_size
        full = seq.num_computed_tokens // block_size
        if full <= seq.num_cached_blocks:
            return
        known = len(seq.block_hashes)
        if known < full:  # output tokens filled blocks past the prompt's
            parent = seq.block_hashes[-1] if seq.block_hashes else self.cache_root
            tokens = [seq.token_at(p) for p in range(known * block_size, full * block_size)]
            seq.block_hashes += self._hashes_from(parent, tokens)
        for i in range(seq.num_cached_blocks, full):
            self.prefix_cache.add(seq.blocks[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence and give its cache blocks back at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
