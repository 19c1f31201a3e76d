"""Next-token choice: greedy in one batched argmax, the rest row by row with each request's own RNG."""

from __future__ import annotations

import torch

from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import use_native


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | Exception]:
    """logits [B, V] (fp32) -> one token id per row, or the error that row's sampling raised: one
    request's failure is that request's alone, and every other row keeps its own RNG's order."""
    chosen: list[int | Exception] = greedy_tokens(logits).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            try:
                chosen[row] = sample_row(logits[row], p, gen)
            except (RuntimeError, ValueError) as exc:  # what torch's sampling ops raise
                chosen[row] = exc
    return chosen


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the native kernel where it takes the rows (4x torch's argmax here)."""
    kernels = native_kernels()
    if (
        kernels is not None
        and logits.dtype == torch.float32
        and logits.is_contiguous()
        and logits.numel()
        and use_native("argmax", logits.shape[0])
    ):
        return kernels.argmax_rows(logits)
    return torch.argmax(logits, dim=-1)


def _scaled(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    # less the largest first: the same distribution, and a tiny temperature (1e-40) then scales the
    # others towards -inf instead of overflowing every logit to inf (NaN probabilities)
    return (logits - logits.max()) / p.temperature


def _filtered_sorted(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled logits sorted best first, with those top_k and top_p leave out at -inf; and the order."""
    sorted_logits, order = torch.sort(_scaled(logits, p), descending=True)
    if 0 < p.top_k < sorted_logits.numel():
        sorted_logits[p.top_k :] = float("-inf")
    if p.top_p < 1.0:
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        beyond = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        # the most likely token always stays: a top_p below fp32's smallest number rounds
        # to 0, which would otherwise drop every token
        beyond[0] = False
        sorted_logits[beyond] = float("-inf")
    return sorted_logits, order


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    if p.top_k > 0 or p.top_p < 1.0:
        sorted_logits, order = _filtered_sorted(logits, p)
        pick = torch.multinomial(torch.softmax(sorted_logits, dim=-1), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(torch.softmax(_scaled(logits, p), dim=-1), 1, generator=generator))


def target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution `sample_row` draws from, over the vocabulary in its own order."""
    if p.top_k > 0 or p.top_p < 1.0:
        sorted_logits, order = _filtered_sorted(logits, p)
        return torch.zeros_like(sorted_logits).scatter_(0, order, torch.softmax(sorted_logits, dim=-1))
    return torch.softmax(_scaled(logits, p), dim=-1)
