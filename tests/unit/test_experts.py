"""Expert dispatch: sorted batches, group slices and both compute paths against a naive loop."""

import pytest
import torch
import torch.nn.functional as F

import expertmesh.model.experts as experts_module
from expertmesh.kernels import native_kernels
from expertmesh.model.experts import (
    ColocatedExpertBackend,
    ExpertPartition,
    ExpertWeights,
    apply_experts,
    combine,
    plan_dispatch,
)


def naive_moe(x, ids, weights, gate_up, down):
    """Token by token, expert by expert: sum_k w_k * SwiGLU_e(x)."""
    out = torch.zeros_like(x)
    inter = down.shape[1]
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = x[t] @ gate_up[e]
            out[t] += weights[t, k] * ((F.silu(h[:inter]) * h[inter:]) @ down[e])
    return out


def make_weights(experts, hidden, inter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        torch.randn(experts, hidden, 2 * inter, generator=gen) * 0.1,
        torch.randn(experts, inter, hidden, generator=gen) * 0.1,
    )


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run once with the fused native kernel (when this machine built it) and once with torch's paths."""
    if request.param == "torch":
        monkeypatch.setattr(experts_module, "native_kernels", lambda: None)
    elif native_kernels() is None:
        pytest.skip("the native kernel did not build here; see tests/unit/test_native_kernels.py")
    return request.param


@pytest.mark.parametrize("tokens,k", [(1, 2), (6, 2), (40, 4), (300, 4)])  # fused, looped and batched paths
def test_apply_experts_matches_naive(tokens, k, kernels):
    experts, hidden, inter = 8, 16, 16
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    w = make_weights(experts, hidden, inter)
    batch, dispatch = plan_dispatch(x, ids, weights, experts)
    assert sum(batch.counts) == tokens * k
    got = combine(apply_experts(w, batch), dispatch, x)
    torch.testing.assert_close(got, naive_moe(x, ids, weights, w.gate_up, w.down), atol=1e-5, rtol=1e-5)


def test_groups_run_separately_give_the_same_result_as_the_whole_layer():
    # What a disaggregated deployment does: each group's slice to its own pool.
    experts, groups, hidden, inter, tokens = 16, 4, 16, 8, 50
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.randint(0, experts, (tokens, 3), generator=gen)
    weights = torch.rand(tokens, 3, generator=gen)
    w = make_weights(experts, hidden, inter)
    partition = ExpertPartition(experts, groups)
    batch, _ = plan_dispatch(x, ids, weights, experts)
    whole = ColocatedExpertBackend({0: w}).run(0, batch)
    pieces = [apply_experts(w.for_group(partition, g), batch.for_group(partition, g)) for g in range(groups)]
    torch.testing.assert_close(torch.cat(pieces), whole)
    for g in range(groups):
        rows = batch.for_group(partition, g).num_rows
        assert rows == int(((ids >= g * 4) & (ids < (g + 1) * 4)).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k", [(1, 8), (32, 4), (300, 2)])
def test_native_dispatch_and_combine_are_torchs_bit_for_bit(tokens, k, dtype):
    # The native pair replaces argsort/bincount/index_select and zeros_like/index_add_/+=;
    # the model's outputs must not move by a bit, in either dtype.
    if native_kernels() is None:
        pytest.skip("the native kernels did not build here; see tests/unit/test_native_kernels.py")
    experts, hidden = 16, 64
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, experts, (tokens, k), generator=gen)  # repeats too: the sort must stay stable
    weights = torch.rand(tokens, k, generator=gen).to(dtype)
    batch, dispatch = plan_dispatch(x, ids, weights, experts)
    assert dispatch.rows_of is not None  # the native path ran
    order = torch.argsort(ids.reshape(-1), stable=True)
    assert torch.equal(dispatch.token_index, order // k)
    assert torch.equal(batch.hidden, x[order // k]) and torch.equal(batch.weights, weights.reshape(-1)[order])
    assert batch.counts == torch.bincount(ids.reshape(-1), minlength=experts).tolist()

    routed = torch.randn(tokens * k, hidden, generator=gen).to(dtype)
    shared = torch.randn(tokens, hidden, generator=gen).to(dtype)
    reference = torch.zeros_like(x).index_add_(0, dispatch.token_index, routed)
    assert torch.equal(combine(routed, dispatch, x), reference)
    assert torch.equal(combine(routed, dispatch, x, shared), reference + shared)


def test_native_dispatch_refuses_an_expert_id_outside_the_layer():
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("the native kernels did not build here; see tests/unit/test_native_kernels.py")
    with pytest.raises(RuntimeError, match=r"expert id 9 is outside \[0, 8\)"):
        kernels.moe_dispatch(torch.randn(2, 16), torch.tensor([[1, 9], [0, 2]]), torch.rand(2, 2), 8)


def test_partition_rejects_uneven_groups():
    with pytest.raises(ValueError, match="must divide num_experts"):
        ExpertPartition(10, 4)
