"""Speculative decoding's two decisions, as pure functions: what to propose, what to keep.

n-gram proposal (prompt lookup, as vLLM's `ngram` method): the tokens that followed the latest
earlier occurrence of the sequence's trailing n-gram, longest n first. It costs no model and finds
something wherever text repeats itself: code, quotes, structured output, a model that loops.

Verification runs the sequence's last token and the proposals through the model in one pass (a
span over the cache, as a prefill chunk). For a greedy request a proposal is kept while it is
the token the model picks at its position; the model's own pick after the last kept one comes
free, so each verified step yields 1 to k + 1 tokens, exactly the tokens plain decoding gives.
For a sampled request each proposal is kept with the model's probability for it (rejection
sampling), so the output has exactly plain sampling's distribution, though not its draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expertmesh.engine.sampler import sample_row, target_probs
from expertmesh.engine.sampling_params import SamplingParams


def propose_ngram(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """`k` tokens that followed the earlier occurrence of the longest trailing n-gram (at
    most `ngram_max`, at least `ngram_min` tokens; the latest occurrence among equally long
    ones); [] when none matches (pure). One backward scan for the last token, then each
    candidate's match is extended backwards."""
    total = len(tokens)
    last = tokens[-1] if total else None
    best_len, best_end = 0, -1
    for end in range(total - 2, -1, -1):
        if tokens[end] != last:
            continue
        length = 1
        while length < ngram_max and end >= length and tokens[end - length] == tokens[total - 1 - length]:
            length += 1
        if length > best_len:
            best_len, best_end = length, end
            if length == ngram_max:
                break
    if best_len < ngram_min:
        return []
    # copy what followed the match; where that reaches the end of the history (a repeat whose
    # period is shorter than k), the copy runs on into its own proposals, continuing the period
    extended = list(tokens[best_end + 1 :])
    while len(extended) < k:
        extended += extended[: k - len(extended)]
    return extended[:k]


def accept_greedy(proposals: Sequence[int], picks: Sequence[int]) -> list[int]:
    """The tokens a verified step yields (pure): the proposals the model itself picked, in order,
    then its pick after the last of them. `picks[i]` is the model's greedy token after the
    sequence's last token and the first i proposals (len(proposals) + 1 of them)."""
    kept = 0
    while kept < len(proposals) and proposals[kept] == picks[kept]:
        kept += 1
    return [*proposals[:kept], picks[kept]]


def accept_sampled(
    logits: torch.Tensor, proposals: Sequence[int], params: SamplingParams, generator: torch.Generator | None
) -> list[int]:
    """The tokens a verified span yields for a sampled request, drawn so that each is distributed
    exactly as plain sampling would draw it (speculative sampling with a proposal that is one
    token for sure): proposal d is kept with probability p(d), the model's probability for it
    after temperature, top_k and top_p; at the first refusal the token is drawn from p with d
    removed; with every proposal kept, one more is drawn from the last row. `logits` has a row
    after the last token and after each proposal."""
    tokens = []
    for row, proposal in enumerate(proposals):
        probs = target_probs(logits[row], params)
        if float(torch.rand(1, generator=generator)) < float(probs[proposal]):
            tokens.append(proposal)
            continue
        probs[proposal] = 0.0  # p(d) < 1 here, so something is left to draw
        tokens.append(int(torch.multinomial(probs / probs.sum(), 1, generator=generator)))
        return tokens
    return [*tokens, sample_row(logits[len(proposals)], params, generator)]
