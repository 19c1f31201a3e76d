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


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    # less the largest first: the same distribution, and a tiny temperature (1e-40) then scales the
    # others towards -inf instead of overflowing every logit to inf (NaN probabilities)
    logits = (logits - logits.max()) / p.temperature
    if p.top_k > 0 or p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
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
        pick = torch.multinomial(torch.softmax(sorted_logits, dim=-1), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
