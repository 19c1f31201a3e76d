"""Turns a step plan into one flat forward pass and returns the logits to sample from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expertmesh.engine.kv_cache import KVCache
from expertmesh.engine.scheduler import StepPlan
from expertmesh.engine.sequence import Sequence
from expertmesh.kernels import native_kernels
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.layers import pack_linear_weights
from expertmesh.model.micro_batch import plan_micro_batches
from expertmesh.model.transformer import CausalLM


@dataclass
class StepResult:
    sampled: list[Sequence]  # sequences that produce a token this step, in logits row order
    logits: torch.Tensor  # [len(sampled), V] fp32
    # per verifying sequence: its proposals and the logits after its last token and each proposal
    verified: list[tuple[Sequence, list[int], torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self, model: CausalLM, cache: KVCache, micro_batches: int = 1, micro_batch_min_tokens: int = 64
    ):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.micro_batches, self.micro_batch_min_tokens = micro_batches, micro_batch_min_tokens
        self.micro_batched_steps = 0  # steps run as two micro-batches, for tests and benchmarks
        native_kernels()  # build (or load) them now, not inside the first step
        pack_linear_weights(model)

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of `seq`."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(seq.blocks)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def _span(
        self, seq: Sequence, start: int, n: int, row: int, positions: list, slot_parts: list
    ) -> PrefillSpan:
        """Positions [start, start + n) of `seq` as batch rows [row, row + n), attending over the
        cache from position 0."""
        positions.append(torch.arange(start, start + n))
        slot_parts.append(self._slots(seq, start, start + n))
        span = PrefillSpan(row, row + n, cached=start)
        if start:
            span.context_slots = self._slots(seq, 0, start + n)
            keys = torch.arange(start + n)
            queries = torch.arange(start, start + n)
            span.mask = (keys.unsqueeze(0) <= queries.unsqueeze(1)).view(1, 1, n, start + n)
        return span

    def build(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, ForwardBatch, list[Sequence], list[int], list[range]]:
        """The step's input ids and batch, the sequences sampled from and their rows, and each
        verifying sequence's rows."""
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        sampled: list[Sequence] = []
        sample_rows: list[int] = []

        decodes = plan.decodes
        decode_slots = lengths = None
        if decodes:
            # Built as Python lists, each turned into a tensor once: a tensor op per sequence
            # costs more than the lists at a decode step's batch sizes.
            block_size = self.block_size
            last = [s.num_computed_tokens for s in decodes]  # the position each one decodes
            width = max(last) + 1
            num_blocks = -(-width // block_size)
            table = torch.tensor(
                [s.blocks[:num_blocks] + [0] * (num_blocks - len(s.blocks)) for s in decodes],
                dtype=torch.long,
            )
            decode_slots = (
                (table.unsqueeze(-1) * block_size + torch.arange(block_size))
                .flatten(1)[:, :width]
                .contiguous()
            )
            last_positions = torch.tensor(last)
            lengths = last_positions + 1
            token_ids.extend(s.token_at(p) for s, p in zip(decodes, last, strict=True))
            positions.append(last_positions)
            slot_parts.append(
                torch.tensor(
                    [
                        s.blocks[p // block_size] * block_size + p % block_size
                        for s, p in zip(decodes, last, strict=True)
                    ]
                )
            )
            sampled.extend(decodes)
            sample_rows.extend(range(len(decodes)))

        spans = []
        row = len(decodes)
        for seq, n in plan.prefills:
            start = seq.num_computed_tokens
            token_ids.extend(seq.prompt_token_ids[start : start + n])
            spans.append(self._span(seq, start, n, row, positions, slot_parts))
            row += n
            if start + n == len(seq.prompt_token_ids):  # prompt complete: its last row yields a token
                sampled.append(seq)
                sample_rows.append(row - 1)
        verify_rows = []
        for seq, proposals in plan.verifies:  # a span from the last token, every row sampled
            start, n = seq.num_computed_tokens, 1 + len(proposals)
            token_ids.extend([seq.token_at(start), *proposals])
            spans.append(self._span(seq, start, n, row, positions, slot_parts))
            verify_rows.append(range(row, row + n))
            row += n

        batch = ForwardBatch(
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slot_parts),
            num_decode=len(decodes),
            decode_slots=decode_slots,
            decode_lengths=lengths,
            prefills=spans,
        )
        return torch.tensor(token_ids), batch, sampled, sample_rows, verify_rows

    def execute(self, plan: StepPlan) -> StepResult:
        input_ids, batch, sampled, rows, verify_rows = self.build(plan)
        blocks = self.model.moe_blocks
        split_at = plan_micro_batches(
            batch,
            len(input_ids),
            self.micro_batches,
            self.micro_batch_min_tokens,
            concurrent_backend=bool(blocks) and getattr(blocks[0].backend, "concurrent", False),
        )
        self.micro_batched_steps += split_at is not None
        hidden = self.model(input_ids, batch, self.cache.layers, split_at=split_at)
        for seq, n in plan.prefills:
            seq.num_computed_tokens += n
        for seq in plan.decodes:
            seq.num_computed_tokens += 1
        # one pass over the LM head for every row sampled or verified: it reads the whole vocab matrix
        all_rows = rows + [r for span in verify_rows for r in span]
        if not all_rows:
            return StepResult(sampled, hidden.new_zeros(0, 0))
        logits = self.model.logits(hidden[all_rows])
        # a verifying sequence's computed count moves by what the engine keeps of its proposals
        verified, start = [], len(rows)
        for (seq, proposals), span in zip(plan.verifies, verify_rows, strict=True):
            verified.append((seq, proposals, logits[start : start + len(span)]))
            start += len(span)
        return StepResult(sampled, logits[: len(rows)], verified)
