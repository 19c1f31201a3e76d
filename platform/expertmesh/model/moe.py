"""Sparse MLP block: route, dispatch to the expert backend, combine, add the shared expert."""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.model.config import MoEConfig
from expertmesh.model.experts import ExpertBackend, plan_dispatch
from expertmesh.model.layers import GatedMLP
from expertmesh.model.routing import moge_routing, topk_routing


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEConfig, layer: int):
        super().__init__()
        self.moe, self.layer = moe, layer
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.router_scale = nn.Parameter(torch.ones(1, moe.num_experts)) if moe.router_scale else None
        self.shared_expert = (
            GatedMLP(hidden_size, moe.shared_expert_intermediate_size)
            if moe.shared_expert_intermediate_size
            else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if moe.shared_expert_gate else None
        self.backend: ExpertBackend | None = None  # set by the model once experts are placed
        self.last_expert_counts: list[int] = []  # rows per expert in the latest step, for metrics

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.moe.routing == "moge":
            return moge_routing(logits, self.moe.num_routing_groups, self.router_scale)
        return topk_routing(logits, self.moe.num_experts_per_tok, self.moe.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.route(x)
        batch, token_index = plan_dispatch(x, expert_ids, weights, self.moe.num_experts)
        self.last_expert_counts = batch.counts
        out = torch.zeros_like(x).index_add_(0, token_index, self.backend.run(self.layer, batch))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            out += shared
        return out
