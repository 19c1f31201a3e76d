"""Time each native op against its torch twin on a model's own shapes (the guard's measuring half).

Every call goes through the model's real entry points (`linear`, `apply_experts`,
`RMSNorm.add_and_norm`, ...) with the op forced onto one path, then the other, so what
is timed is exactly what a step would run. The decision itself is
`expertmesh.kernels.guard.choose`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.sampler import greedy_tokens
from expertmesh.kernels.guard import CHOICES, DECODE, NATIVE, PREFILL, TORCH, Choice, Timing, choose, describe
from expertmesh.model.attention import Attention, ForwardBatch, LayerKVCache
from expertmesh.model.experts import (
    ColocatedExpertBackend,
    ExpertBatch,
    ExpertWeights,
    apply_experts,
    combine,
    plan_dispatch,
)
from expertmesh.model.layers import GatedMLP, Linear, linear, silu_and_mul
from expertmesh.model.mla import LatentKVCache, MultiHeadLatentAttention
from expertmesh.model.transformer import CausalLM

log = logging.getLogger(__name__)

REPEATS = 3  # alternating native/torch timings per case, best of each kept
# Prefill-sized ops are timed at the step's token budget, up to this many tokens: beyond it a
# matmul's speed per row no longer changes, only the load time would.
MAX_PREFILL_ROWS = 1024
DECODE_CONTEXT = 256  # positions each sequence attends over where decode attention is timed
CLEAR_WIN = 2.0  # one path this many times slower after a round: the rounds after it cannot change the choice


def time_both(op: str, fn: Callable[[], object], repeats: int = REPEATS) -> tuple[float, float]:
    """(native, torch) best seconds of fn() with `op` forced onto each path, alternating."""
    best = {NATIVE: float("inf"), TORCH: float("inf")}
    for path in (NATIVE, TORCH):  # once each untimed: packing, first-touch pages
        with CHOICES.forced(op, path):
            fn()
    for _ in range(repeats):
        for path in (NATIVE, TORCH):
            with CHOICES.forced(op, path):
                start = time.perf_counter()
                fn()
                best[path] = min(best[path], time.perf_counter() - start)
        if max(best.values()) > CLEAR_WIN * min(best.values()):
            break
    return best[NATIVE], best[TORCH]


def _linear_cases(model: CausalLM) -> list[tuple[torch.Tensor, torch.Tensor | None, int, bool]]:
    """(weight, bias, how many modules share its shape, is it the LM head) per distinct linear shape."""
    fused = {
        id(lin.weight)
        for mlp in model.modules()
        if isinstance(mlp, GatedMLP) and mlp.fused_layout() is not None
        for lin in (mlp.gate_up_proj, mlp.down_proj)
    }
    by_shape: dict[tuple, list] = {}
    for module in model.modules():
        if isinstance(module, Linear) and id(module.weight) not in fused:
            key = (tuple(module.weight.shape), module.weight.dtype, module.bias is None)
            by_shape.setdefault(key, [module.weight, module.bias, 0, False])[2] += 1
    cases = [tuple(v) for v in by_shape.values()]
    cases.append((model.lm_head.weight, None, 1, True))
    return cases


def _experts_case(model: CausalLM):
    """One sparse layer's block and expert weights, where this process holds them; else None."""
    for block in model.moe_blocks:
        if isinstance(block.backend, ColocatedExpertBackend):
            return block, block.backend.layers[block.layer]
    return None


@dataclass(frozen=True)
class Case:
    """One call to time: `fn` runs `op` on `rows` rows of one of the model's shapes."""

    op: str
    rows: int
    fn: Callable[[], object]
    weight: int = 1  # how many of the model's calls a step makes of this shape


def cases(model: CausalLM, size_class: str, tokens: int, gen: torch.Generator) -> list[Case]:
    """Every guarded op of `model` on a step of `tokens` tokens, through the model's own entry points."""
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype

    def rows_of(width: int, rows: int = tokens) -> torch.Tensor:
        return torch.randn(rows, width, generator=gen).to(dtype)

    found: list[Case] = []
    for weight, bias, count, lm_head in _linear_cases(model):
        if lm_head and size_class == PREFILL:
            continue  # a prefill step takes logits of its last tokens only: decode-sized
        found.append(Case("linear", tokens, partial(linear, rows_of(weight.shape[1]), weight, bias), count))
    attn = model.layers[0].self_attn
    if isinstance(attn, Attention):  # MLA runs its RoPE and attention on torch's ops
        found.append(_rotary_case(model, attn, tokens, dtype, gen))
    if size_class == DECODE:
        context = min(DECODE_CONTEXT, cfg.max_position_embeddings)
        if isinstance(attn, Attention):
            found.append(_attention_case(attn, tokens, context, dtype, gen))
        else:
            found.append(_latent_attention_case(attn, tokens, context, dtype, gen))
    x = rows_of(cfg.hidden_size)
    found.append(Case("rms_norm", tokens, partial(model.norm.add_and_norm, x, x)))
    for inter in sorted({m.intermediate_size for m in model.modules() if isinstance(m, GatedMLP)}):
        found.append(Case("silu_and_mul", tokens, partial(silu_and_mul, rows_of(2 * inter))))
    if size_class == DECODE:
        logits = torch.randn(tokens, cfg.vocab_size, generator=gen)
        found.append(Case("argmax", tokens, partial(greedy_tokens, logits)))
    experts = _experts_case(model)
    if experts is not None:
        block, weights = experts
        k, num_experts = block.moe.num_experts_per_tok, block.moe.num_experts
        found.append(experts_case(weights, tokens * k, gen))
        ids = torch.rand(tokens, num_experts, generator=gen).topk(k, dim=1).indices
        routing = torch.rand(tokens, k, generator=gen)
        routed = rows_of(cfg.hidden_size, tokens * k)
        dispatch = partial(_dispatch_and_combine, x, ids, routing, routed, num_experts)
        found.append(Case("moe_dispatch", tokens, dispatch))
    return found


def _scattered_slots(slots: int, gen: torch.Generator) -> torch.Tensor:
    """[0, slots) in the order a paged cache hands them out: blocks of 16 consecutive slots,
    the blocks anywhere."""
    block = 16 if slots % 16 == 0 else 1
    return (torch.randperm(slots // block, generator=gen)[:, None] * block + torch.arange(block)).flatten()


def _scattered_cache(attn: Attention, slots: int, dtype: torch.dtype, gen: torch.Generator):
    """A cache of `slots` random K/V rows, and its slots in paged order."""
    cache = LayerKVCache(slots, attn.num_kv_heads, attn.head_dim, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache, _scattered_slots(slots, gen)


def _decode_batch(seqs: int, context: int, slots: torch.Tensor) -> ForwardBatch:
    return ForwardBatch(
        positions=torch.full((seqs,), context - 1),
        num_decode=seqs,
        decode_slots=slots.view(seqs, context),
        decode_lengths=torch.full((seqs,), context),
    )


def _attention_case(
    attn: Attention, seqs: int, context: int, dtype: torch.dtype, gen: torch.Generator
) -> Case:
    """Decode attention: one query per sequence over `context` cached positions."""
    cache, slots = _scattered_cache(attn, seqs * context, dtype, gen)
    q = torch.randn(seqs, attn.num_heads, attn.head_dim, generator=gen).to(dtype)
    return Case("attention", seqs, partial(attn.decode, q, _decode_batch(seqs, context, slots), cache))


def _latent_attention_case(
    attn: MultiHeadLatentAttention, seqs: int, context: int, dtype: torch.dtype, gen: torch.Generator
) -> Case:
    """MLA's decode attention: every head's latent-space query over `context` cached latent rows."""
    width = attn.mla.cache_width
    cache = LatentKVCache(seqs * context, width, dtype)
    cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen))
    batch = _decode_batch(seqs, context, _scattered_slots(seqs * context, gen))
    queries = torch.randn(seqs, attn.num_heads, width, generator=gen).to(dtype)
    return Case("attention", seqs, partial(attn.attend_latent, queries, batch, cache))


def _rotary_case(
    model: CausalLM, attn: Attention, tokens: int, dtype: torch.dtype, gen: torch.Generator
) -> Case:
    """RoPE on q and k of `tokens` projected rows, and their K/V cache write."""
    positions = torch.arange(tokens) % model.config.max_position_embeddings
    cache, slots = _scattered_cache(attn, tokens, dtype, gen)
    qkv = torch.randn(tokens, attn.q_size + 2 * attn.kv_size, generator=gen).to(dtype)
    rope = model.rotary.lookup(positions, dtype)
    batch = ForwardBatch(positions=positions, slot_mapping=slots)
    return Case("rotary", tokens, partial(attn.rotate_and_cache, qkv, rope, batch, cache))


def experts_case(weights: ExpertWeights, rows: int, gen: torch.Generator) -> Case:
    """The fused experts on `rows` token-expert rows spread at random over the experts of `weights`."""
    num_experts, hidden = weights.gate_up.shape[0], weights.gate_up.shape[1]
    counts = torch.bincount(torch.randint(num_experts, (rows,), generator=gen), minlength=num_experts)
    x = torch.randn(rows, hidden, generator=gen).to(weights.gate_up.dtype)
    batch = ExpertBatch(x, torch.rand(rows, generator=gen), counts.tolist())
    return Case("experts", rows, partial(apply_experts, weights, batch))


def _dispatch_and_combine(x, ids, routing, routed, num_experts: int) -> torch.Tensor:
    _, dispatch = plan_dispatch(x, ids, routing, num_experts)
    return combine(routed, dispatch, x)


def measure(cases_of: Callable[[str, int], list[Case]], decode_rows: int, prefill_rows: int) -> list[Timing]:
    """Time every case `cases_of(size_class, rows)` gives at `decode_rows` and at `prefill_rows`."""
    timings = []
    with torch.no_grad():
        for size_class, rows in ((DECODE, decode_rows), (PREFILL, prefill_rows)):
            for case in cases_of(size_class, rows):
                native_s, torch_s = time_both(case.op, case.fn)
                timings.append(Timing(case.op, size_class, case.rows, native_s, torch_s, case.weight))
    return timings


def decode_max_rows(model: CausalLM, decode_rows: int) -> dict[str, int]:
    """The most rows an op sees in a decode step: tokens, or token-expert rows for the experts."""
    k = model.moe_blocks[0].moe.num_experts_per_tok if model.moe_blocks else 1
    return {
        "attention": decode_rows,
        "rotary": decode_rows,
        "linear": decode_rows,
        "rms_norm": decode_rows,
        "silu_and_mul": decode_rows,
        "argmax": decode_rows,
        "moe_dispatch": decode_rows,
        "experts": decode_rows * k,
    }


def guard_kernels(
    model: CausalLM, decode_rows: int, prefill_rows: int
) -> tuple[dict[str, Choice], list[Timing]]:
    """Measure `model`'s ops at `decode_rows` and `prefill_rows` tokens, choose, and apply the
    choices to this process; returns both for the log."""
    gen = torch.Generator().manual_seed(0)
    timings = measure(partial(cases, model, gen=gen), decode_rows, prefill_rows)
    choices = choose(timings, decode_max_rows(model, decode_rows))
    CHOICES.update(choices)
    return choices, timings


def guard_experts(
    weights: ExpertWeights, decode_rows: int, prefill_rows: int
) -> tuple[dict[str, Choice], list[Timing]]:
    """The same for a process that holds only experts (an expert-pool replica): the fused
    experts against torch's matmuls on `weights` (one layer's), at the token-expert rows a
    decode step and a prefill step send it."""
    gen = torch.Generator().manual_seed(0)
    timings = measure(lambda _, rows: [experts_case(weights, rows, gen)], decode_rows, prefill_rows)
    choices = choose(timings, {"experts": decode_rows})
    CHOICES.update(choices)
    return choices, timings


def guard_expert_pool(
    weights: dict[int, ExpertWeights], k: int, groups: int, engine: EngineConfig
) -> tuple[dict[str, Choice], list[str]]:
    """guard_experts in an expert-pool replica holding one of `groups` groups of a top-`k` model
    served with `engine`'s limits: a step of T tokens sends it about T k / groups rows (exactly,
    under MoGE). Logs each choice once; returns the choices and those lines."""

    def rows(tokens: int) -> int:
        return max(1, tokens * k // groups)

    prefill_tokens = min(engine.max_num_batched_tokens, MAX_PREFILL_ROWS)
    choices, timings = guard_experts(
        next(iter(weights.values())), rows(engine.max_num_seqs), rows(prefill_tokens)
    )
    report = describe(choices, timings)
    for line in report:
        log.info("kernel guard: %s", line)
    return choices, report
