"""Multi-head latent attention (DeepSeek-V2/V3, arXiv 2405.04434) over the paged cache.

Each token's keys and values come from one normed `kv_lora_rank` latent plus one rotary key
shared by every head, and the cache keeps only those (`LatentKVCache`): DeepSeek-V3 caches
512 + 64 values a token and layer where full K and V would take 2 x 128 heads x 128+.

Prefill expands the latent into per-head keys and values with `kv_b_proj` and runs ordinary
attention, since its queries outnumber nothing they could save. Decode never expands the
cache: the query's no-rope part is multiplied into W_UK (kv_b_proj's key half), so it becomes a
query in latent space; attention then runs as one KV head over [latent | rope key], and the
latent-space output goes through W_UV (the value half). Each decode step reads the cached
576 values a token once, for all heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import use_native
from expertmesh.model.attention import ForwardBatch, LayerKVCache, PrefillSpan
from expertmesh.model.config import MLAConfig
from expertmesh.model.layers import Linear, RMSNorm, _cached_on, apply_rotary


class LatentKVCache:
    """One layer's MLA cache: per flat slot, the normed latent followed by the rotated rope key."""

    def __init__(self, num_slots: int, width: int, dtype: torch.dtype):
        self.latent = torch.zeros(num_slots, width, dtype=dtype)

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.latent.index_copy_(0, slots, rows)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        return LayerKVCache.gather(self.latent, slots)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mla: MLAConfig):
        super().__init__()
        self.mla, self.num_heads = mla, num_heads
        query_width = mla.q_lora_rank or num_heads * mla.qk_head_dim
        # The query's first projection and the latent's read the same rows: one matmul
        # (checkpoint keys q_a_proj | q_proj and kv_a_proj_with_mqa, stacked at load).
        self.qkv_a_proj = Linear(hidden_size, query_width + mla.cache_width, bias=False)
        self.q_a_layernorm = RMSNorm(mla.q_lora_rank, mla.latent_norm_eps) if mla.q_lora_rank else None
        self.q_b_proj = (
            Linear(mla.q_lora_rank, num_heads * mla.qk_head_dim, bias=False) if mla.q_lora_rank else None
        )
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, mla.latent_norm_eps)
        self.kv_b_proj = Linear(
            mla.kv_lora_rank, num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = Linear(num_heads * mla.v_head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        cache: LatentKVCache | None,
    ) -> torch.Tensor:
        num_tokens, v_width = x.shape[0], self.num_heads * self.mla.v_head_dim
        q, rows = self.project(x, rope)
        if cache is not None:
            cache.write(batch.slot_mapping, rows)
        if not batch.prefills:
            return self.o_proj(self.decode(q, batch, cache).reshape(num_tokens, v_width))
        out = q.new_empty(num_tokens, self.num_heads, self.mla.v_head_dim)
        if batch.num_decode:
            out[: batch.num_decode] = self.decode(q[: batch.num_decode], batch, cache)
        for span in batch.prefills:
            out[span.start : span.end] = self._prefill(q, rows, span, cache)
        return self.o_proj(out.view(num_tokens, v_width))

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [T, heads, nope + rope] with RoPE on their rope part, cache rows [T, latent + rope])."""
        mla, num_tokens = self.mla, x.shape[0]
        query, latent = self.qkv_a_proj(x).split(
            [self.qkv_a_proj.out_features - mla.cache_width, mla.cache_width], dim=-1
        )
        if self.q_b_proj is not None:
            query = self.q_b_proj(self.q_a_layernorm(query.contiguous()))
        q = query.reshape(num_tokens, self.num_heads, mla.qk_head_dim)
        q[..., mla.qk_nope_head_dim :] = apply_rotary(q[..., mla.qk_nope_head_dim :], *rope)
        k_rope = apply_rotary(latent[:, None, mla.kv_lora_rank :], *rope).squeeze(1)
        rows = torch.cat([self.kv_a_layernorm(latent[:, : mla.kv_lora_rank].contiguous()), k_rope], dim=-1)
        return q, rows

    def expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows [L, latent + rope] -> per-head keys [L, heads, nope + rope] and values [L, heads, v]."""
        mla, length = self.mla, rows.shape[0]
        kv = self.kv_b_proj(rows[:, : mla.kv_lora_rank]).view(length, self.num_heads, -1)
        k_nope, values = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k_rope = rows[:, None, mla.kv_lora_rank :].expand(length, self.num_heads, mla.qk_rope_head_dim)
        return torch.cat([k_nope, k_rope], dim=-1), values

    def _prefill(
        self, q: torch.Tensor, rows: torch.Tensor, span: PrefillSpan, cache: LatentKVCache | None
    ) -> torch.Tensor:
        context = rows[span.start : span.end] if span.cached == 0 else cache.gather(span.context_slots)
        keys, values = self.expand(context)
        out = F.scaled_dot_product_attention(
            q[span.start : span.end].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=span.mask if span.cached else None,
            is_causal=not span.cached,
            scale=self.mla.softmax_scale,
        )
        return out.squeeze(0).transpose(0, 1)

    def decode(self, q: torch.Tensor, batch: ForwardBatch, cache: LatentKVCache) -> torch.Tensor:
        """Absorbed attention of one query per sequence over its cached latents: [n, heads, v]."""
        nope = self.mla.qk_nope_head_dim
        w_uk, w_uv_t = self.absorbed()
        q_latent = torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)
        queries = torch.cat([q_latent, q[..., nope:]], dim=-1)  # [n, heads, latent + rope]
        out = self.attend_latent(queries, batch, cache)  # [n, heads, latent]
        return torch.bmm(out.transpose(0, 1), w_uv_t).transpose(0, 1)

    def attend_latent(self, queries: torch.Tensor, batch: ForwardBatch, cache: LatentKVCache) -> torch.Tensor:
        """Every head of each sequence's latent-space query [n, heads, latent + rope] over its cached
        rows, the latent part of each row also its value: [n, heads, latent]."""
        mla, num_seqs = self.mla, queries.shape[0]
        kernels = native_kernels()
        if (
            kernels is not None
            and batch.decode_lengths is not None
            and mla.cache_width % 16 == 0
            and mla.kv_lora_rank % 16 == 0
            and use_native("attention", num_seqs)
        ):  # reads each cached row in place, once for every head
            return kernels.mla_decode_attention(
                queries,
                cache.latent,
                batch.decode_slots,
                batch.decode_lengths,
                mla.kv_lora_rank,
                mla.softmax_scale,
            )
        # As plain matmuls: SDPA takes a value narrower than the key only on its slow math path.
        context = cache.gather(batch.decode_slots)  # [n, L, latent + rope]
        scores = torch.bmm(queries * mla.softmax_scale, context.transpose(1, 2)).float()
        scores.masked_fill_(~batch.decode_mask.view(num_seqs, 1, -1), float("-inf"))
        return torch.bmm(torch.softmax(scores, dim=-1).to(context.dtype), context[..., : mla.kv_lora_rank])

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [heads, nope, latent], W_UV transposed [heads, latent, v]) from kv_b_proj, made once
        (again if the weight is written to)."""
        return _cached_on(self.kv_b_proj.weight, "_expertmesh_absorbed", self._split_kv_b)

    def _split_kv_b(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.view(self.num_heads, -1, self.mla.kv_lora_rank)
        w_uk, w_uv = w.split([self.mla.qk_nope_head_dim, self.mla.v_head_dim], dim=1)
        return w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()
