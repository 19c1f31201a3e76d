"""Continuous batching with chunked prefill.

Each step: every running sequence that has finished its prompt decodes one
token; prompts still being read get the rest of the step's token budget, in
arrival order; waiting requests join, in arrival order, while the budget, the
batch size and the KV cache allow. A request reserves the cache blocks for its
whole life when it joins, so a running sequence never has to be preempted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.kv_cache import BlockAllocator, blocks_for
from expertmesh.engine.sequence import Sequence, SequenceStatus


@dataclass
class StepPlan:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    admitted: list[Sequence] = field(default_factory=list)  # waiting sequences that join this step

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


def plan_step(
    running: list[Sequence],
    waiting: Iterable[Sequence],
    free_blocks: int,
    config: EngineConfig,
    blocks_needed: Callable[[Sequence], int],
) -> StepPlan:
    """Pure: what runs this step, given the queues and the free cache blocks."""
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
    for seq in waiting:
        need = blocks_needed(seq)
        if budget <= 0 or seats <= 0 or need > free_blocks:
            break  # first come, first served: nobody overtakes the head of the queue
        n = min(len(seq.prompt_token_ids), budget)
        plan.admitted.append(seq)
        plan.prefills.append((seq, n))
        budget, seats, free_blocks = budget - n, seats - 1, free_blocks - need
    return plan


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, max_model_len: int):
        self.config, self.allocator, self.max_model_len = config, allocator, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks for the prompt and every token the request may still generate."""
        total = min(len(seq.prompt_token_ids) + seq.params.max_tokens, self.max_model_len)
        return blocks_for(total, self.config.block_size)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        plan = plan_step(self.running, self.waiting, self.allocator.num_free, self.config, self.blocks_needed)
        for seq in plan.admitted:
            self.waiting.popleft()
            seq.blocks = self.allocator.allocate(self.blocks_needed(seq))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return plan

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
