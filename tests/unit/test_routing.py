"""Routing against references written here from the definitions, not from our code."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.model.routing import moge_routing, topk_routing


def moge_reference(
    logits: torch.Tensor, groups: int, router_scale: torch.Tensor
) -> list[list[tuple[int, float]]]:
    """Pangu Pro MoE, token by token: softmax over all experts; in each equal group the
    single highest-probability expert; its weight times router_scale[expert]; no renormalisation."""
    num_experts = logits.shape[1]
    size = num_experts // groups
    picks = []
    for row in logits.tolist():
        peak = max(row)
        exps = [math.exp(v - peak) for v in row]
        total = sum(exps)
        probs = [e / total for e in exps]
        token = []
        for g in range(groups):
            members = range(g * size, (g + 1) * size)
            best = max(members, key=lambda e: (probs[e], -e))
            token.append((best, probs[best] * float(router_scale[best])))
        picks.append(token)
    return picks


def test_moge_matches_the_papers_definition():
    gen = torch.Generator().manual_seed(0)
    for tokens, experts, groups in [(1, 8, 2), (37, 64, 8), (5, 16, 4), (128, 32, 8)]:
        logits = torch.randn(tokens, experts, generator=gen) * 3
        scale = torch.rand(1, experts, generator=gen) + 0.5
        weights, ids = moge_routing(logits, groups, scale)
        expected = moge_reference(logits, groups, scale.flatten())
        assert ids.tolist() == [[e for e, _ in row] for row in expected]
        torch.testing.assert_close(weights, torch.tensor([[w for _, w in row] for row in expected]))


def test_moge_does_not_renormalise():
    logits = torch.randn(4, 16)
    weights, _ = moge_routing(logits, 4, None)
    assert (weights.sum(-1) < 1).all()


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 300),
    groups=st.sampled_from([1, 2, 4, 8]),
    per_group=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    spread=st.floats(0.0, 50.0),
)
def test_every_group_gets_exactly_tokens_times_k_over_g(tokens, groups, per_group, seed, spread):
    # Whatever the logits (even wildly skewed towards a few experts), MoGE's load per
    # group is exact: tokens * k / G, with k == G.
    logits = torch.randn(tokens, groups * per_group, generator=torch.Generator().manual_seed(seed)) * spread
    _, ids = moge_routing(logits, groups, None)
    per_group_load = torch.bincount(ids.flatten() // per_group, minlength=groups)
    assert per_group_load.tolist() == [tokens * groups // groups] * groups


def test_topk_matches_reference_and_can_renormalise():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 12, generator=gen)
    for normalize in (False, True):
        weights, ids = topk_routing(logits, 3, normalize)
        probs = torch.softmax(logits.double(), -1)
        for t in range(20):
            ranked = sorted(range(12), key=lambda e: -probs[t, e].item())[:3]
            assert ids[t].tolist() == ranked
            want = torch.tensor([probs[t, e].item() for e in ranked])
            if normalize:
                want = want / want.sum()
            torch.testing.assert_close(weights[t].double(), want.double(), atol=1e-6, rtol=1e-6)
