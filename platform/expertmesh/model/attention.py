"""Grouped-query attention over a flat batch of tokens and a paged KV cache.

A step's tokens are laid out flat: first one token for each decoding sequence,
then each prefill chunk in turn. `ForwardBatch` (built by the engine's model
runner, shared by every layer) says where each token's K/V is stored and which
cache slots each sequence attends to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import use_native
from expertmesh.model.layers import Linear, RMSNorm, apply_rotary


@dataclass
class PrefillSpan:
    """One sequence's prompt chunk: batch rows [start, end), `cached` tokens already in the cache."""

    start: int
    end: int
    cached: int = 0
    context_slots: torch.Tensor | None = None  # cache slots of positions [0, cached + len), when cached > 0
    mask: torch.Tensor | None = None  # [1, 1, len, cached + len] causal mask, when cached > 0


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each token; None: no cache
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decode, L] context slots, padded
    decode_lengths: torch.Tensor | None = None  # [num_decode] context length of each decoding sequence
    prefills: list[PrefillSpan] = field(default_factory=list)

    @functools.cached_property
    def decode_mask(self) -> torch.Tensor | None:
        """[num_decode, 1, 1, L], True where attended: only the torch decode path needs it, once a step."""
        if self.decode_lengths is None:
            return None
        width = self.decode_slots.shape[1]
        return (torch.arange(width) < self.decode_lengths.unsqueeze(1)).view(-1, 1, 1, width)


class LayerKVCache:
    """One layer's K and V, stored as flat slots (block * block_size + offset)."""

    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.k = torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype)
        self.v = torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(0, slots, k)
        self.v.index_copy_(0, slots, v)

    @staticmethod
    def gather(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """store[slots] for any shape of `slots` (index_select is ~3x faster than fancy indexing)."""
        return store.index_select(0, slots.reshape(-1)).view(*slots.shape, *store.shape[1:])


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm_eps: float | None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.scale = head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        cache: LayerKVCache | None,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.rotate_and_cache(self.qkv_proj(x), rope, batch, cache)
        if not batch.prefills:  # decode only: the kernel's output is the whole batch's
            return self.o_proj(self.decode(q, batch, cache).reshape(num_tokens, self.q_size))
        out = torch.empty_like(q)
        if batch.num_decode:
            out[: batch.num_decode] = self.decode(q[: batch.num_decode], batch, cache)
        for span in batch.prefills:
            out[span.start : span.end] = self._prefill(q, k, v, span, cache)
        return self.o_proj(out.view(num_tokens, self.q_size))

    def rotate_and_cache(
        self,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        cache: LayerKVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v heads of the projected qkv [T, ...], with RoPE on q and k (after their norms,
        where the model has them), and each token's k and v written to its cache slot."""
        num_tokens = qkv.shape[0]
        native = self._native_rotary(qkv, rope, cache)
        if native is not None:  # RoPE and the cache write in one pass, in place
            cos, sin = (t.view(num_tokens, self.head_dim) for t in rope)
            cache_write = () if cache is None else (cache.k, cache.v, batch.slot_mapping)
            native.rotary_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim, *cache_write)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if native is None:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                cache.write(batch.slot_mapping, k, v)
        return q, k, v

    def _native_rotary(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache):
        """The native kernels if they can do RoPE (and the cache write) on this qkv, else None
        (also with a q/k norm, which comes between the projection and RoPE)."""
        kernels = native_kernels()
        ok = (
            kernels is not None
            and self.q_norm is None
            and qkv.dim() == 2
            and qkv.is_contiguous()
            and qkv.dtype in (torch.float32, torch.bfloat16)
            and self.head_dim % 32 == 0
            and all(t.dtype == qkv.dtype and t.is_contiguous() for t in rope)
            and (cache is None or (cache.k.dtype == qkv.dtype and cache.k.is_contiguous()))
            and use_native("rotary", qkv.shape[0])
        )
        return kernels if ok else None

    def decode(self, q: torch.Tensor, batch: ForwardBatch, cache: LayerKVCache) -> torch.Tensor:
        """Attention of one query token per sequence over its cached context: [n, heads, d]."""
        # One query per sequence: fold the query heads that share a KV head into the
        # "query length" axis, so no K/V head is ever repeated in memory.
        kernels = native_kernels()
        if (
            kernels is not None
            and batch.decode_lengths is not None
            and self.head_dim % 16 == 0
            and use_native("attention", q.shape[0])
        ):
            return kernels.decode_attention(
                q.contiguous(), cache.k, cache.v, batch.decode_slots, batch.decode_lengths, self.scale
            )
        n = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        keys = cache.gather(cache.k, batch.decode_slots).transpose(1, 2)  # [n, kv_heads, L, d]
        values = cache.gather(cache.v, batch.decode_slots).transpose(1, 2)
        queries = q.view(n, self.num_kv_heads, group, self.head_dim)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=batch.decode_mask, scale=self.scale
        )
        return out.reshape(n, self.num_heads, self.head_dim)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        cache: LayerKVCache | None,
    ) -> torch.Tensor:
        queries = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, heads, len, d]
        if span.cached == 0:
            keys = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
            values = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
            mask, causal = None, True
        else:
            keys = cache.gather(cache.k, span.context_slots).transpose(0, 1).unsqueeze(0)
            values = cache.gather(cache.v, span.context_slots).transpose(0, 1).unsqueeze(0)
            mask, causal = span.mask, False
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
        )
        return out.squeeze(0).transpose(0, 1)
