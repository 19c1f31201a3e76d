"""Routing against references written here from the definitions, not from our code."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.model.routing import moge_routing, noaux_tc_routing, topk_routing


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


# --- DeepSeek-V3's group-limited noaux_tc, against transformers' DeepseekV3TopkRouter ---------


def deepseek_router(
    experts: int, hidden: int, groups: int, topk_group: int, k: int, normalize: bool, scale: float
):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(
        hidden_size=hidden,
        n_routed_experts=experts,
        num_experts_per_tok=k,
        n_group=groups,
        topk_group=topk_group,
        norm_topk_prob=normalize,
        routed_scaling_factor=scale,
    )
    return DeepseekV3TopkRouter(config)


@pytest.mark.parametrize(
    "experts,groups,topk_group,k,normalize,scale",
    [
        (256, 8, 4, 8, True, 2.5),
        (64, 8, 3, 6, False, 1.0),
        (16, 4, 1, 2, True, 1.0),
        (32, 1, 1, 4, True, 1.5),
    ],
)
def test_noaux_tc_matches_transformers_deepseek_v3_router(experts, groups, topk_group, k, normalize, scale):
    hidden = 48
    router = deepseek_router(experts, hidden, groups, topk_group, k, normalize, scale)
    gen = torch.Generator().manual_seed(experts + k)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen) * 0.2)
        router.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.1)
        x = torch.randn(67, hidden, generator=gen)
        logits, want_weights, want_ids = router(x)
    weights, ids = noaux_tc_routing(
        logits, router.e_score_correction_bias, groups, topk_group, k, normalize, scale
    )
    # the reference returns its k experts unsorted: compare each token's (expert, weight) set
    for t in range(x.shape[0]):
        got = sorted(zip(ids[t].tolist(), weights[t].tolist(), strict=True))
        want = sorted(zip(want_ids[t].tolist(), want_weights[t].tolist(), strict=True))
        assert [e for e, _ in got] == [e for e, _ in want]
        assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-6, abs=1e-7)


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.integers(1, 40),
    groups=st.sampled_from([2, 4, 8]),
    data=st.data(),
)
def test_noaux_tc_reaches_at_most_topk_group_groups_and_the_bias_only_chooses(tokens, groups, data):
    per_group = data.draw(st.integers(2, 6))
    topk_group = data.draw(st.integers(1, groups))
    k = data.draw(st.integers(1, topk_group * per_group))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, groups * per_group, generator=gen) * 2
    bias = torch.randn(groups * per_group, generator=gen)
    weights, ids = noaux_tc_routing(logits, bias, groups, topk_group, k, normalize=False, scaling_factor=1.0)
    assert ids.shape == weights.shape == (tokens, k)
    for t in range(tokens):
        assert len(set(ids[t].tolist())) == k
        assert len({e // per_group for e in ids[t].tolist()}) <= topk_group
    # weights are the sigmoid scores of the chosen experts, the correction bias left out
    torch.testing.assert_close(weights, torch.sigmoid(logits).gather(1, ids))
