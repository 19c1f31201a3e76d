"""Decoder-only causal LM for every supported family (dense, top-k MoE, MoGE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.attention import Attention, ForwardBatch, LayerKVCache
from expertmesh.model.config import ModelConfig
from expertmesh.model.experts import ExpertBackend
from expertmesh.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from expertmesh.model.moe import SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.qkv_bias,
            cfg.o_bias,
            cfg.rms_norm_eps if cfg.qk_norm else None,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            SparseMoE(cfg.hidden_size, cfg.moe, layer)
            if cfg.is_moe_layer(layer)
            else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x, rope, batch: ForwardBatch, cache: LayerKVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

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
        caches: list[LayerKVCache] | None = None,
    ) -> torch.Tensor:
        """Flat token batch [T] -> final hidden states [T, H] (before the LM head)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(batch.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, batch, caches[i] if caches is not None else None)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.weight).float()
