"""Decoder-only causal LM for every supported family (dense, top-k MoE, MoGE)."""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.model.attention import Attention, ForwardBatch, LayerKVCache
from expertmesh.model.config import ModelConfig
from expertmesh.model.experts import ExpertBackend
from expertmesh.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, linear
from expertmesh.model.micro_batch import split_forward_batch
from expertmesh.model.mla import LatentKVCache, MultiHeadLatentAttention
from expertmesh.model.moe import SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn: nn.Module = (
            MultiHeadLatentAttention(cfg.hidden_size, cfg.num_heads, cfg.mla)
            if cfg.mla is not None
            else Attention(
                cfg.hidden_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.qkv_bias,
                cfg.o_bias,
                cfg.rms_norm_eps if cfg.qk_norm else None,
            )
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # openPangu's sandwich: post_attention_layernorm norms the attention output itself, then
        # pre_mlp_layernorm the residual stream into the MLP, post_mlp_layernorm the MLP's output
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norm else None
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norm else None
        self.mlp: nn.Module = (
            SparseMoE(cfg.hidden_size, cfg.moe, layer)
            if cfg.is_moe_layer(layer)
            else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self, x, rope, batch: ForwardBatch, cache: LayerKVCache | LatentKVCache | None
    ) -> torch.Tensor:
        return self.finish(self.start(x, rope, batch, cache))

    def start(self, x, rope, batch: ForwardBatch, cache, micro_batch: int = 0) -> tuple:
        """Attention, then the MLP up to the point where a sparse block's experts are out."""
        attended = self.self_attn(self.input_layernorm(x), rope, batch, cache)
        if self.pre_mlp_layernorm is None:
            x, normed = self.post_attention_layernorm.add_and_norm(x, attended)
        else:
            x, normed = self.pre_mlp_layernorm.add_and_norm(x, self.post_attention_layernorm(attended))
        if isinstance(self.mlp, SparseMoE):
            return x, self.mlp.start(normed, accumulate_counts=micro_batch > 0)
        return x + self._mlp_output(self.mlp(normed)), None

    def finish(self, state: tuple) -> torch.Tensor:
        x, pending = state
        return x if pending is None else x + self._mlp_output(self.mlp.finish(pending))

    def _mlp_output(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.post_mlp_layernorm is None else self.post_mlp_layernorm(out)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding.of(cfg)

    @property
    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        for block in self.moe_blocks:
            block.backend = backend

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        batch: ForwardBatch,
        caches: list[LayerKVCache] | list[LatentKVCache] | None = None,
        split_at: int | None = None,
    ) -> torch.Tensor:
        """Flat token batch [T] -> final hidden states [T, H] (before the LM head).

        `split_at` (see micro_batch.plan_micro_batches): run rows [0, split_at) and
        [split_at, T) as two micro-batches that alternate layer by layer, so one's
        expert rows are in flight while the other computes.
        """
        x = self.embed_tokens(input_ids)
        if split_at is None:
            parts, xs = [batch], [x]
        else:
            parts, xs = list(split_forward_batch(batch, split_at)), [x[:split_at], x[split_at:]]
        ropes = [self.rotary.lookup(part.positions, x.dtype) for part in parts]
        # Each micro-batch finishes layer i-1 (waits for its experts) just before it
        # starts layer i, so the other micro-batch's experts stay in flight meanwhile.
        # With one micro-batch this is plain layer order, the shared expert overlapping the experts.
        states: list[tuple | None] = [None] * len(parts)
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            for m, part in enumerate(parts):
                if states[m] is not None:
                    xs[m] = self.layers[i - 1].finish(states[m])
                states[m] = layer.start(xs[m], ropes[m], part, cache, micro_batch=m)
        xs = [self.layers[-1].finish(state) for state in states]
        return self.norm(xs[0] if len(xs) == 1 else torch.cat(xs))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight).float()
