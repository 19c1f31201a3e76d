"""Expert computation behind a backend boundary.

A sparse layer routes each token to k experts, then hands the backend one
`ExpertBatch`: the token rows sorted by expert (each expert's rows contiguous),
their routing weights, and how many rows each expert got. The backend returns the
weighted expert outputs in the same row order. Groups are contiguous ranges of
experts, so a group's share of the batch is a slice (`ExpertBatch.for_group`):
the colocated backend runs the whole layer at once in this process, a remote
backend sends each group's slice to that group's replica pool.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import use_native
from expertmesh.model.layers import rows_ready, silu_and_mul


@dataclass(frozen=True)
class ExpertPartition:
    """Experts split into `num_groups` equal contiguous groups (MoGE groups, or pools for top-k)."""

    num_experts: int
    num_groups: int

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(
                f"expert groups ({self.num_groups}) must divide num_experts ({self.num_experts})"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    def experts_of(self, group: int) -> range:
        size = self.experts_per_group
        return range(group * size, (group + 1) * size)


@dataclass
class ExpertBatch:
    hidden: torch.Tensor  # [n, H] token rows, sorted by expert
    weights: torch.Tensor  # [n] routing weight of each row
    counts: list[int]  # rows per expert, for the experts this batch covers

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    def for_group(self, partition: ExpertPartition, group: int) -> ExpertBatch:
        experts = partition.experts_of(group)
        start = sum(self.counts[: experts.start])
        stop = start + sum(self.counts[experts.start : experts.stop])
        return ExpertBatch(
            self.hidden[start:stop], self.weights[start:stop], self.counts[experts.start : experts.stop]
        )


@dataclass(frozen=True)
class Dispatch:
    """Where each row of an ExpertBatch came from, to add the expert outputs back (`combine`)."""

    token_index: torch.Tensor  # [n]: the token of each row
    rows_of: torch.Tensor | None = None  # [T, k]: each (token, choice)'s row; from the native kernel


def _native_dispatch(rows: torch.Tensor, tokens: int):
    """The kernels, if they take these rows (see `rows_ready`) and the guard keeps them for
    this many tokens."""
    ready = rows_ready(rows, rows.shape[-1], 16) and use_native("moe_dispatch", tokens)
    return native_kernels() if ready else None


def plan_dispatch(
    hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> tuple[ExpertBatch, Dispatch]:
    """Sort the (token, expert) assignments by expert, stably.

    Returns the batch and where its rows came from, for `combine`.
    """
    kernels = _native_dispatch(hidden, hidden.shape[0])
    if kernels is not None:  # one call for torch's argsort, bincount, index_select and gather
        rows, row_weights, token_index, counts, rows_of = kernels.moe_dispatch(
            hidden, expert_ids.contiguous(), weights.contiguous(), num_experts
        )
        return ExpertBatch(rows, row_weights, counts.tolist()), Dispatch(token_index, rows_of)
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_index = order // expert_ids.shape[1]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    batch = ExpertBatch(hidden.index_select(0, token_index), weights.reshape(-1)[order], counts)
    return batch, Dispatch(token_index)


def combine(
    routed: torch.Tensor, dispatch: Dispatch, like: torch.Tensor, shared: torch.Tensor | None = None
) -> torch.Tensor:
    """Each token's weighted expert rows summed (+ the shared expert's output), shaped like `like`."""
    kernels = _native_dispatch(routed, like.shape[0]) if dispatch.rows_of is not None else None
    if kernels is not None and routed.dtype == like.dtype and (shared is None or shared.is_contiguous()):
        return kernels.moe_combine(routed, dispatch.rows_of, shared)
    out = torch.zeros_like(like).index_add_(0, dispatch.token_index, routed)
    if shared is not None:
        out += shared
    return out


@dataclass
class ExpertWeights:
    """Stacked SwiGLU weights of consecutive experts, input-major for `x @ W`."""

    gate_up: torch.Tensor  # [E, H, 2I]: gate then up
    down: torch.Tensor  # [E, I, H]
    # the same weights as the fused kernel reads them fastest (see kernel_layout)
    _kernel_layout: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def kernel_layout(self, kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up and down packed by the kernel (`pack_experts`) so that each of its jobs
        streams one contiguous block: 1.4-1.9x faster at decode sizes than slicing every
        weight row. Made once and kept beside the canonical layout, which the matmul
        paths and group slicing use (so the experts' memory doubles where it is made)."""
        if self._kernel_layout is None:
            self._kernel_layout = tuple(kernels.pack_experts(self.gate_up, self.down))
        return self._kernel_layout

    def for_group(self, partition: ExpertPartition, group: int) -> ExpertWeights:
        experts = partition.experts_of(group)
        return ExpertWeights(
            self.gate_up[experts.start : experts.stop], self.down[experts.start : experts.stop]
        )

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def _fits_fused(weights: ExpertWeights) -> bool:
    intermediate, hidden = weights.down.shape[1:]
    return (
        weights.gate_up.dtype in (torch.float32, torch.bfloat16)
        and weights.gate_up.is_contiguous()
        and weights.down.is_contiguous()
        and intermediate % 16 == 0
        and hidden % 16 == 0
    )


# Above this many rows per expert the padded batched matmul wastes real compute,
# and the per-expert loop's call overhead is small next to each matmul.
_BATCHED_MAX_ROWS_PER_EXPERT = 48


def pack_expert_weights(layers: Iterable[ExpertWeights]) -> None:
    """Pack the weights the fused kernel will read now, at load, not inside a request's first step."""
    fused = native_kernels()
    if fused is not None:
        for weights in layers:
            if _fits_fused(weights):
                weights.kernel_layout(fused)


def apply_experts(weights: ExpertWeights, batch: ExpertBatch) -> torch.Tensor:
    """Weighted SwiGLU expert outputs for `batch`, rows in batch order."""
    hidden = batch.hidden
    if batch.num_rows == 0:
        return hidden.new_zeros(0, weights.down.shape[-1])
    widest = max(batch.counts)
    fused = native_kernels()
    if fused is not None and _fits_fused(weights) and use_native("experts", batch.num_rows):
        offsets = torch.tensor([0, *itertools.accumulate(batch.counts)])
        # in hidden's dtype already
        return fused.fused_experts(
            hidden.contiguous(), offsets, *weights.kernel_layout(fused), batch.weights.float().contiguous()
        )
    active = sum(1 for c in batch.counts if c)
    if 4 * active >= 3 * len(batch.counts) and widest <= _BATCHED_MAX_ROWS_PER_EXPERT:
        out = _apply_batched(weights, batch, widest)
    else:
        out = _apply_looped(weights, batch)
    return out.mul_(batch.weights.unsqueeze(1).to(out.dtype))


def _apply_looped(weights: ExpertWeights, batch: ExpertBatch) -> torch.Tensor:
    out = batch.hidden.new_empty(batch.num_rows, weights.down.shape[-1])
    start = 0
    for expert, count in enumerate(batch.counts):
        if count:
            rows = slice(start, start + count)
            act = silu_and_mul(torch.mm(batch.hidden[rows], weights.gate_up[expert]))
            torch.mm(act, weights.down[expert], out=out[rows])
            start += count
    return out


def _apply_batched(weights: ExpertWeights, batch: ExpertBatch, widest: int) -> torch.Tensor:
    # Pad every expert to the same row count and run two batched matmuls for all of them.
    num_experts = len(batch.counts)
    counts = torch.tensor(batch.counts)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts), counts)
    starts = torch.cumsum(counts, 0) - counts
    # row i of the batch goes to row `flat[i]` of the [E * widest, H] padded block
    flat = expert_of_row * widest + torch.arange(batch.num_rows) - starts[expert_of_row]
    hidden = batch.hidden.shape[1]
    padded = batch.hidden.new_zeros(num_experts * widest, hidden).index_copy_(0, flat, batch.hidden)
    act = silu_and_mul(torch.bmm(padded.view(num_experts, widest, hidden), weights.gate_up))
    return torch.bmm(act, weights.down).view(num_experts * widest, -1).index_select(0, flat)


class ExpertBackend(Protocol):
    """Runs layer `layer`'s experts on a batch; returns [n, H] weighted outputs in row order.

    `submit` starts the work and `wait` collects it, so the caller can compute in
    between; `run` is both at once. `concurrent` says whether that in-between
    work really overlaps the experts (they run elsewhere) or just comes first.
    """

    concurrent: bool

    def run(self, layer: int, batch: ExpertBatch) -> torch.Tensor: ...

    def submit(self, layer: int, batch: ExpertBatch) -> object: ...

    def wait(self, handle: object) -> torch.Tensor: ...


class ColocatedExpertBackend:
    """Every expert of every layer in this process: the whole layer in one call."""

    concurrent = False  # same thread: submit computes at once, nothing overlaps

    def __init__(self, layers: dict[int, ExpertWeights]):
        self.layers = layers
        pack_expert_weights(layers.values())

    def run(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        return apply_experts(self.layers[layer], batch)

    def submit(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        return self.run(layer, batch)  # through run, so subclasses that wrap run see every call

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle
