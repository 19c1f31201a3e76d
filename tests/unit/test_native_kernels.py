"""The native CPU kernels against plain torch written out in the test."""

import itertools
import shutil
import threading
import time

import pytest
import torch

import expertmesh.engine.sampler as sampler
import expertmesh.model.attention as attention
import expertmesh.model.experts as experts
import expertmesh.model.layers as layers
from expertmesh import LLM
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.kernels import buildable_levels, kernels_for, native_kernels
from expertmesh.model.experts import ExpertWeights
from expertmesh.model.layers import silu_and_mul


def kernels():
    module = native_kernels()
    if module is None:
        pytest.skip(
            "the native kernels did not build here (see test_native_kernels_build_where_a_compiler_exists)"
        )
    return module


@pytest.fixture(params=buildable_levels())
def level_kernels(request):
    """The kernels built for each ISA level this CPU runs (EXPERTMESH_CPU_ISA's levels): the
    lower levels' designs are checked on whatever CPU the tests run on."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: expert layers use torch's matmuls")
    return kernels_for(request.param)


def make_weights(experts, hidden, inter, seed):
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        torch.randn(experts, hidden, 2 * inter, generator=gen) * 0.1,
        torch.randn(experts, inter, hidden, generator=gen) * 0.1,
    )


def test_native_kernels_build_where_a_compiler_exists():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: expert layers use torch's matmuls")
    assert native_kernels() is not None, "the native kernels failed to build; see the warning log"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(16, 16), (48, 32), (64, 48), (96, 64), (128, 96), (576, 544)])
@pytest.mark.parametrize(
    "counts", [[0, 1, 5, 6, 7, 13, 12, 2], [17, 0, 33, 64, 1, 40, 0, 31], [0, 270, 3, 33]]
)
def test_fused_kernel_matches_naive_for_every_tile_shape(hidden, inter, dtype, packed, counts, level_kernels):
    # Row counts 0..13 per expert cross the kernel's 6-row register tiles, 17..270 the tile
    # unit's 16-row tiles, 32-row blocks and 256-row jobs (bf16, where the CPU has AMX); the
    # sizes exercise 1, 2 and 4 vectors per column block, in the canonical and the packed layout.
    module = level_kernels
    gen = torch.Generator().manual_seed(hidden + inter)
    rows = sum(counts)
    x = torch.randn(rows, hidden, generator=gen)
    row_weights = torch.rand(rows, generator=gen)
    w = make_weights(len(counts), hidden, inter, seed=inter)
    w = ExpertWeights(w.gate_up.to(dtype), w.down.to(dtype))
    layout = w.kernel_layout(module) if packed else (w.gate_up, w.down)
    pairs = layout[0].dim() == 6  # bf16 packed for the bf16 dot product: bf16 rows and activations
    got = module.fused_experts(x, torch.tensor([0, *itertools.accumulate(counts)]), *layout, row_weights)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    rows_in = x.bfloat16().float() if pairs else x

    def activation(r, e):
        act = silu_and_mul(rows_in[r] @ w.gate_up[e].float())
        return act.bfloat16().float() if pairs else act

    want = torch.stack(
        [
            row_weights[r] * (activation(r, e) @ w.down[e].float())
            for r, e in enumerate(expert_of_row.tolist())
        ]
    )
    # fp32 sums in another order can move a bf16 activation by one ulp (2^-8 of it), and fp32's
    # own rounding error: both grow with the length of the sums
    longest = max(1.0, max(hidden, inter) / 128)
    tolerance = dict(atol=2e-3 * longest, rtol=1e-2) if pairs else dict(atol=1e-5 * longest, rtol=1e-4)
    torch.testing.assert_close(got, want, **tolerance)


def test_bf16_experts_are_pair_packed_where_the_cpu_has_bf16_dot_products(level_kernels):
    module = level_kernels
    w = make_weights(3, 64, 32, seed=1)
    gate_up, down = ExpertWeights(w.gate_up.bfloat16(), w.down.bfloat16()).kernel_layout(module)
    if module.has_bf16_dot():
        assert (gate_up.shape, down.shape) == ((3, 1, 32, 2, 32, 2), (3, 1, 16, 64, 2))
        # gate_up[e, block, k / 2, gate or up, column, k % 2]: expert 1, k = 5, up column 7
        assert gate_up[1, 0, 2, 1, 7, 1] == w.gate_up[1, 5, 32 + 7].bfloat16()
        assert down[2, 0, 4, 9, 1] == w.down[2, 9, 9].bfloat16()  # down[e, block, k / 2, column, k % 2]
    else:
        assert (gate_up.dim(), down.dim()) == (5, 4)


def test_prefill_sized_fp32_batches_take_the_fused_kernel_and_match_matmuls(monkeypatch):
    # fp32 experts run the fused kernel at every batch size (hundreds of rows per expert in a
    # prefill chunk); the result must equal the per-expert matmul path.
    module = kernels()
    gen = torch.Generator().manual_seed(7)
    counts = [300, 0, 41, 129, 7, 256]
    x = torch.randn(sum(counts), 64, generator=gen)
    batch = experts.ExpertBatch(x, torch.rand(sum(counts), generator=gen), counts)
    w = make_weights(len(counts), 64, 48, seed=7)
    calls = []

    class CountingKernels:
        pack_experts = staticmethod(module.pack_experts)

        def fused_experts(self, *args):
            calls.append((args[1].tolist(), args[2].dim()))
            return module.fused_experts(*args)

    monkeypatch.setattr(experts, "native_kernels", CountingKernels)
    got = experts.apply_experts(w, batch)
    assert calls == [([0, 300, 300, 341, 470, 477, 733], 5)]  # one call, every expert, packed weights
    want = experts._apply_looped(w, batch).mul_(batch.weights.unsqueeze(1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "cache_dtype,q_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (8, 2, 64), (6, 3, 32), (4, 2, 128), (2, 1, 256)])
def test_decode_attention_matches_softmax_over_the_gathered_context(
    heads, kv_heads, dim, cache_dtype, q_dtype, level_kernels
):
    # bf16 q with a bf16 cache is a bf16 model's case: its own path on the bf16 dot product
    # (lengths past 16 (position, head) pairs, and not a multiple of them, for its reductions)
    module = level_kernels
    gen = torch.Generator().manual_seed(heads * dim)
    lengths = torch.tensor([1, 7, 33, 20, 3])
    width, num_slots = int(lengths.max()), 200
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=gen).to(cache_dtype)
    slots = torch.stack(
        [torch.randperm(num_slots, generator=gen)[:width] for _ in lengths]
    )  # scattered blocks
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(q_dtype)
    scale = dim**-0.5
    got = module.decode_attention(q, k_cache, v_cache, slots, lengths, scale)
    assert got.dtype == q_dtype
    group = heads // kv_heads
    for i, n in enumerate(lengths.tolist()):
        context = slots[i, :n]  # padding past the length must be ignored
        for h in range(heads):
            keys = k_cache[context, h // group].float()
            values = v_cache[context, h // group].float()
            want = torch.softmax(keys @ q[i, h].float() * scale, dim=0) @ values
            if q_dtype == torch.bfloat16:  # rounded once, at the end: within one bf16 step
                torch.testing.assert_close(got[i, h].float(), want.bfloat16().float(), atol=1e-5, rtol=2**-7)
            else:
                torch.testing.assert_close(got[i, h], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,width,v_dim", [(4, 48, 32), (8, 576, 512), (1, 32, 32), (6, 80, 48), (3, 96, 80)]
)
def test_mla_decode_attention_attends_every_head_over_the_latent_rows(
    heads, width, v_dim, dtype, level_kernels
):
    """MLA's absorbed decode: one latent row per position serves every head, as key (all W
    values) and as value (its first v_dim)."""
    gen = torch.Generator().manual_seed(width + heads)
    lengths = torch.tensor([1, 7, 33, 20, 3])
    num_slots = 200
    latent = torch.randn(num_slots, width, generator=gen).to(dtype)
    slots = torch.stack([torch.randperm(num_slots, generator=gen)[: int(lengths.max())] for _ in lengths])
    q = torch.randn(len(lengths), heads, width, generator=gen).to(dtype)
    scale = 0.07
    got = level_kernels.mla_decode_attention(q, latent, slots, lengths, v_dim, scale)
    assert got.shape == (len(lengths), heads, v_dim) and got.dtype == dtype
    for i, n in enumerate(lengths.tolist()):
        rows = latent[slots[i, :n]].float()  # padding past the length must be ignored
        want = torch.softmax(q[i].float() @ rows.T * scale, dim=-1) @ rows[:, :v_dim]
        if dtype == torch.bfloat16:
            torch.testing.assert_close(got[i].float(), want.bfloat16().float(), atol=1e-5, rtol=2**-7)
        else:
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4)


def test_mla_decode_attention_names_a_bad_value_width(level_kernels):
    latent = torch.zeros(8, 48)
    with pytest.raises(RuntimeError, match="v_dim must be in"):
        level_kernels.mla_decode_attention(
            torch.zeros(1, 2, 48), latent, torch.zeros(1, 4, dtype=torch.long), torch.tensor([2]), 64, 1.0
        )


def test_decode_attention_rejects_a_length_beyond_its_slots(level_kernels):
    module = level_kernels
    cache = torch.zeros(8, 1, 16)
    with pytest.raises(RuntimeError, match="lengths must be in"):
        module.decode_attention(
            torch.zeros(1, 1, 16), cache, cache, torch.zeros(1, 4, dtype=torch.long), torch.tensor([5]), 1.0
        )


def linear_case(rows, out_features, in_features, with_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype) if with_bias else None
    return x, weight, bias


def assert_linear_close(got, x, weight, bias):
    # fp32: F.linear itself. bf16: the exact fp32 sum rounded once to bf16, as oneDNN stores
    # it; another summation order may move that rounding by one ulp.
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    else:
        want = torch.nn.functional.linear(
            x.double(), weight.double(), None if bias is None else bias.double()
        )
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 32])
@pytest.mark.parametrize("out_features,in_features", [(1, 16), (30, 48), (64, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_linear_matches_f_linear(rows, out_features, in_features, with_bias, dtype, level_kernels):
    # Column counts that do not fill a 4-column block, and row counts across the 6-row tiles.
    module = level_kernels
    x, weight, bias = linear_case(rows, out_features, in_features, with_bias, dtype, rows * out_features)
    assert_linear_close(module.small_linear(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 32, 33, 70])
@pytest.mark.parametrize(
    "out_features,in_features", [(16, 16), (32, 48), (48, 32), (192, 512), (592, 64), (1088, 96)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear(rows, out_features, in_features, with_bias, dtype, level_kernels):
    # Out-features that pack into 1-, 2- and 4-vector column blocks, rows across the 6-row tiles
    # (and for bf16 on AMX, the 16-row tiles and 32-row jobs).
    module = level_kernels
    seed = rows * out_features + in_features
    x, weight, bias = linear_case(rows, out_features, in_features, with_bias, dtype, seed)
    assert_linear_close(module.packed_linear(x, module.pack_linear(weight), bias), x, weight, bias)


def tile_kernels():
    module = kernels()
    if not module.has_tile_linear():
        pytest.skip("fp32 tile linears need a CPU and OS with AMX (AMX-BF16)")
    return module


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 32, 33, 70, 1024 + 2048 + 17])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 64), (64, 512), (208, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tile_linear_has_fp32s_accuracy(rows, out_features, in_features, with_bias):
    # Rows across the 16-row tiles and 2-tile jobs, and past the 1024-row chunks x is split in
    # (the last one partial); out-features that leave a lone 16-column block.
    # The bound is fp32's own for a K-term dot product, K * 2^-24 * sum |x w|; dropping the lo.mid
    # products (bf16x3, about 2^-16 each) breaks it, and so does any mislaid tile.
    module = tile_kernels()
    seed = rows * out_features + in_features
    x, weight, bias = linear_case(rows, out_features, in_features, with_bias, torch.float32, seed)
    got = module.tile_linear(x, module.pack_tile_linear(weight), bias)
    want = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert ((got.double() - want).abs() <= in_features * 2**-24 * magnitude).all()
    assert_linear_close(got, x, weight, bias)


def test_tile_weights_split_exactly_into_three_bf16_parts():
    module = tile_kernels()
    gen = torch.Generator().manual_seed(7)
    # values across many binades, and ones that need all 24 significand bits
    weight = torch.randn(32, 64, generator=gen) * torch.logspace(-6, 6, 64)
    weight[0, :8] = torch.tensor([1 + 2**-23, -(1 - 2**-24), 3.0, 0.0, 2**-20, 1e-30, 65504.0, 0.1])
    packed = module.pack_tile_linear(weight)  # [N / 16, K / 32, 3, 16, 16, 2]
    assert packed.dtype == torch.bfloat16 and packed.shape == (2, 2, 3, 16, 16, 2)
    planes = packed.permute(2, 0, 4, 1, 3, 5).reshape(3, 32, 64).float()
    assert torch.equal(planes[0] + planes[1] + planes[2], weight)
    assert torch.equal(planes[0], weight.bfloat16().float())  # hi is weight rounded to bf16


def test_tile_linear_against_an_identity_returns_the_other_operand_bit_for_bit():
    # x . I == x and I . w == w only if every value's hi + mid + lo split (activations per call,
    # weights at packing) is exact and no part is lost: values across many binades and ones that
    # need all 24 significand bits.
    module = tile_kernels()
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(48, 64, generator=gen) * torch.logspace(-6, 6, 64)
    values[0, :8] = torch.tensor([1 + 2**-23, -(1 - 2**-24), 3.0, 0.0, 2**-20, 1e-30, 65504.0, 0.1])
    identity = torch.eye(64)
    assert torch.equal(module.tile_linear(identity, module.pack_tile_linear(values)), values.T)
    assert torch.equal(module.tile_linear(values, module.pack_tile_linear(identity)), values)


def test_fp32_linears_take_the_tile_kernel_from_16_rows(monkeypatch):
    module = tile_kernels()
    calls = []
    monkeypatch.setattr(
        layers, "native_kernels", lambda: _Recording(module, calls, ("tile_linear", "packed_linear"))
    )
    weight, bias = torch.randn(64, 96), torch.randn(64)
    for rows in (4, 16, 40):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layers.linear(x, weight, bias), x @ weight.T + bias, atol=1e-4, rtol=1e-5)
    assert calls == ["packed_linear", "tile_linear", "tile_linear"]


@pytest.mark.parametrize("rows", [1, 32, 70])
@pytest.mark.parametrize("gated", [False, True])
def test_bf16_gated_mlp_runs_as_one_fused_expert_on_the_tile_unit(rows, gated, monkeypatch):
    # A shared expert's (or a dense model's) SwiGLU in bf16: gate and up products meet in the
    # kernel's tiles, silu(gate) * up is rounded to bf16 once, and the down products are scaled
    # by the row weights (the shared expert's sigmoid gate) as they are stored.
    module = tile_kernels()
    calls = []
    monkeypatch.setattr(layers, "native_kernels", lambda: _Recording(module, calls, ("fused_experts",)))
    torch.manual_seed(rows)
    mlp = layers.GatedMLP(96, 160).bfloat16()
    for weight in (mlp.gate_up_proj.weight, mlp.down_proj.weight):
        torch.nn.init.normal_(weight, std=0.1)
    x = torch.randn(rows, 96).bfloat16()
    row_weights = torch.rand(rows, 1) if gated else None
    got = mlp(x, row_weights)
    gate, up = (x.float() @ mlp.gate_up_proj.weight.float().T).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).bfloat16().float() @ mlp.down_proj.weight.float().T
    if gated:
        want = want * row_weights
    assert calls == ["fused_experts"] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)
    with torch.no_grad():  # written to after the first call: packed again
        mlp.down_proj.weight.mul_(-1.0)
    torch.testing.assert_close(mlp(x, row_weights).float(), -want, atol=2e-2, rtol=1e-2)


def test_tile_experts_read_the_rows_moe_dispatch_leaves_spare_without_their_values_leaking():
    # moe_dispatch leaves 16 rows after the sorted rows so that the tile jobs can read past the
    # last expert's rows in place; whatever those rows hold (here NaN) never reaches the outputs.
    module = tile_kernels()
    counts = [17, 0, 33, 5]
    rows = sum(counts)
    w = make_weights(len(counts), 64, 96, seed=3)
    layout = ExpertWeights(w.gate_up.bfloat16(), w.down.bfloat16()).kernel_layout(module)
    storage = torch.full((rows + 16, 64), float("nan"), dtype=torch.bfloat16)
    storage[:rows] = torch.randn(rows, 64).bfloat16()
    offsets, row_weights = torch.tensor([0, *itertools.accumulate(counts)]), torch.rand(rows)
    in_place = module.fused_experts(storage[:rows], offsets, *layout, row_weights)
    copied = module.fused_experts(storage[:rows].clone(), offsets, *layout, row_weights)
    assert torch.isfinite(in_place).all() and torch.equal(in_place, copied)
    hidden = torch.randn(10, 64).bfloat16()
    ids, weights = torch.randint(0, len(counts), (10, 2)), torch.rand(10, 2)
    sorted_rows = module.moe_dispatch(hidden, ids, weights, len(counts))[0]
    assert sorted_rows.untyped_storage().nbytes() >= (20 + 16) * 64 * 2


def test_linear_repacks_a_weight_that_was_written_to():
    kernels()
    x = torch.randn(4, 32)
    weight = torch.randn(64, 32)
    torch.testing.assert_close(layers.linear(x, weight), x @ weight.T, atol=1e-4, rtol=1e-5)
    weight.mul_(-2.0)  # e.g. weights loaded into a module after its first forward pass
    torch.testing.assert_close(layers.linear(x, weight), x @ weight.T, atol=1e-4, rtol=1e-5)


def test_engine_gives_the_same_tokens_with_and_without_the_native_kernels(make_engine, monkeypatch):
    # Batched greedy decode (mixed prompt lengths) through every kernel, then through torch alone.
    kernels()
    prompts = ["def main():", "import os\nimport sys\n\nclass Pool:", "x"]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)

    def run() -> list[list[int]]:
        engine = make_engine()
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        return [done[i] for i in ids]

    native = run()
    for module in (attention, experts, layers, sampler):
        monkeypatch.setattr(module, "native_kernels", lambda: None)
    assert run() == native


@pytest.mark.parametrize("checkpoint", ["pangu_tiny", "qwen2_moe_tiny"])
def test_bf16_engine_on_the_native_kernels_agrees_with_torchs_bf16_path(checkpoint, request, monkeypatch):
    # bf16 linears and experts run on the CPU's bf16 dot product where it has one. Both paths
    # round to bf16, at slightly different places, so a sequence may part from torch's after a
    # near-tie; each prompt's first greedy token (its prefill) must agree.
    module = kernels()
    llm = LLM(request.getfixturevalue(checkpoint), "bfloat16", show_progress=False)
    block = llm.engine.model.moe_blocks[0]
    if module.has_bf16_dot():  # the model's experts are pair-packed for the bf16 dot product
        assert block.backend.layers[block.layer].kernel_layout(module)[0].dim() == 6
    prompts = ["def main():", "import os\nimport sys\n\nclass Pool:", "x", "for i in range(10):"]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)

    def first_tokens() -> list[int]:
        return [o.outputs[0].token_ids[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    native = first_tokens()
    for module_with_kernels in (attention, experts, layers, sampler):
        monkeypatch.setattr(module_with_kernels, "native_kernels", lambda: None)
    assert first_tokens() == native


# --- row-wise kernels: silu_and_mul, rms_norm, rotary_qkv -----------------------------------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the HF families' RMSNorm, written out
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def assert_close_for(dtype, got, want, rtol_fp32=2e-6):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=rtol_fp32, atol=1e-6)
    else:  # bf16: the same roundings as torch's ops; a sum's order may move one ulp
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("rows,vocab", [(1, 5), (3, 17), (32, 16384), (5, 151936)])
def test_argmax_rows_is_torchs_argmax(rows, vocab, level_kernels):
    module = level_kernels
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    assert torch.equal(module.argmax_rows(logits), torch.argmax(logits, dim=-1))


def test_argmax_rows_breaks_ties_and_meets_nans_and_infinities_as_torch_does(level_kernels):
    module = level_kernels
    logits = torch.zeros(6, 40)
    logits[0, 3] = logits[0, 30] = 1.0  # a tie: the first
    logits[1, 2], logits[1, 5], logits[1, 9] = 7.0, float("nan"), 5.0  # a NaN beats a larger value
    logits[2] = float("-inf")
    logits[3, 39] = 2.0  # in the scalar tail
    logits[4, 38] = float("nan")
    logits[5, 33] = float("inf")
    assert (
        module.argmax_rows(logits).tolist() == torch.argmax(logits, dim=-1).tolist() == [3, 5, 0, 39, 38, 33]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 16), (7, 48), (33, 1536)])
def test_silu_and_mul_matches_torch_and_is_contiguous(rows, inter, dtype, level_kernels):
    module = level_kernels
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype)
    got = module.silu_and_mul(gate_up)
    want = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert got.is_contiguous() and got.shape == (rows, inter) and got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)  # silu rounded, then the product rounded, as torch does
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 16), (9, 512), (130, 1024)])
def test_rms_norm_with_and_without_the_residual_add_matches_torch(rows, hidden, dtype, level_kernels):
    module = level_kernels
    gen = torch.Generator().manual_seed(hidden)
    x, delta = (torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(2))
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    (normed,) = module.rms_norm(x, weight, 1e-6)
    assert_close_for(dtype, normed, torch_rms_norm(x, weight, 1e-6))
    summed, normed = module.rms_norm(x, weight, 1e-5, delta)
    assert torch.equal(summed, x + delta)
    assert_close_for(dtype, normed, torch_rms_norm(x + delta, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_cache", [False, True])
def test_rotary_qkv_rotates_q_and_k_in_place_and_writes_the_cache(with_cache, dtype, level_kernels):
    module = level_kernels
    rows, heads, kv_heads, dim = 11, 4, 2, 64
    gen = torch.Generator().manual_seed(dim)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    positions = torch.randint(0, 500, (rows,), generator=gen)
    rope = layers.RotaryEmbedding(dim, 512, theta=10000.0)
    cos, sin = rope.lookup(positions, dtype)  # [T, 1, dim]
    q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    want_q = torch_rotate_half(q.view(rows, heads, dim), cos, sin)
    want_k = torch_rotate_half(k.view(rows, kv_heads, dim), cos, sin)
    k_cache = torch.zeros(40, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros(40, kv_heads, dim, dtype=dtype)
    slots = torch.randperm(40, generator=gen)[:rows]
    cache_args = (k_cache, v_cache, slots) if with_cache else ()
    module.rotary_qkv(qkv, cos.view(rows, dim), sin.view(rows, dim), heads, kv_heads, dim, *cache_args)
    got_q, got_k, got_v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    assert_close_for(dtype, got_q.reshape(rows, heads, dim), want_q)
    assert_close_for(dtype, got_k.reshape(rows, kv_heads, dim), want_k)
    assert torch.equal(got_v, v)  # v is not rotated
    if with_cache:
        assert torch.equal(k_cache[slots], got_k.reshape(rows, kv_heads, dim))
        assert torch.equal(v_cache[slots], v.reshape(rows, kv_heads, dim))
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[slots] = False
        assert not k_cache[untouched].any() and not v_cache[untouched].any()
    else:
        assert not k_cache.any()


def test_model_blocks_take_the_row_wise_kernels_for_contiguous_rows(monkeypatch):
    module = kernels()
    called = []
    monkeypatch.setattr(layers, "native_kernels", lambda: _Recording(module, called))
    norm = layers.RMSNorm(64, 1e-6)
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), torch_rms_norm(x, norm.weight, 1e-6), rtol=2e-6, atol=1e-6)
    summed, normed = norm.add_and_norm(x, x)
    assert torch.equal(summed, x + x)
    gate_up = torch.randn(3, 64)
    torch.testing.assert_close(
        silu_and_mul(gate_up),
        torch.nn.functional.silu(gate_up[:, :32]) * gate_up[:, 32:],
        rtol=1e-6,
        atol=1e-7,
    )
    assert called == ["rms_norm", "rms_norm", "silu_and_mul"]
    # a strided view is not contiguous rows: torch's ops, same values
    called.clear()
    view = torch.randn(3, 128)[:, :64]
    torch.testing.assert_close(norm(view), torch_rms_norm(view, norm.weight, 1e-6))
    assert called == []


class _Recording:
    """The native module, noting which of `names` (kernels) were called."""

    def __init__(self, module, called, names=("silu_and_mul", "rms_norm")):
        self._module, self._called, self._names = module, called, names

    def __getattr__(self, name):
        if name in self._names:
            self._called.append(name)
        return getattr(self._module, name)


def test_kernels_release_the_gil_while_they_run():
    # A server's event loop shares the process with the engine thread: during a step's long
    # kernels it must keep running. Python's other threads progress during one long call.
    module = kernels()
    packed = module.pack_linear(torch.randn(4096, 512))
    probe = torch.randn(256, 512)
    module.packed_linear(probe, packed)  # warm: the intra-op threads start on the first call
    start = time.perf_counter()
    module.packed_linear(probe, packed)
    # rows for one call of about 0.2 s on this machine, whatever its speed
    rows = min(1 << 16, max(256, int(256 * 0.2 / (time.perf_counter() - start))))
    x = torch.randn(rows, 512)
    ticks, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.05)
    start = time.perf_counter()
    module.packed_linear(x, packed)  # one call
    end = time.perf_counter()
    done.set()
    thread.join()
    during = [t for t in ticks if start < t < end]
    assert end - start > 0.05, "the call was too short to tell"
    # Measured here over a 0.2 s call: about 200 ticks; 5 when the kernels held the GIL.
    assert len(during) >= 25, f"{len(during)} ticks during a {end - start:.3f} s kernel call"
