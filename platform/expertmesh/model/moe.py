"""Sparse MLP block: route, dispatch to the expert backend, combine, add the shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.config import MoEConfig
from expertmesh.model.experts import Dispatch, ExpertBackend, combine, plan_dispatch
from expertmesh.model.layers import GatedMLP, Linear
from expertmesh.model.routing import moge_routing, noaux_tc_routing, topk_routing


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEConfig, layer: int):
        super().__init__()
        self.moe, self.layer = moe, layer
        self.gate = Linear(hidden_size, moe.num_experts, bias=False)
        self.router_scale = nn.Parameter(torch.ones(1, moe.num_experts)) if moe.router_scale else None
        # noaux_tc: the per-expert bias added for choosing experts only; kept in fp32 as released
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(moe.num_experts, dtype=torch.float32))
            if moe.routing == "noaux_tc"
            else None
        )
        self.shared_expert = (
            GatedMLP(hidden_size, moe.shared_expert_intermediate_size)
            if moe.shared_expert_intermediate_size
            else None
        )
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if moe.shared_expert_gate else None
        self.backend: ExpertBackend | None = None  # set by the model once experts are placed
        self.last_expert_counts: list[int] = []  # rows per expert in the latest step, for metrics

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.moe
        if moe.routing == "noaux_tc":  # scored in fp32, as DeepSeek's gate is
            logits = F.linear(x.float(), self.gate.weight.float())
            weights, ids = noaux_tc_routing(
                logits,
                self.e_score_correction_bias,
                moe.num_groups,
                moe.topk_group,
                moe.num_experts_per_tok,
                moe.norm_topk_prob,
                moe.routed_scaling_factor,
            )
            return weights.to(x.dtype), ids
        logits = self.gate(x)
        if self.moe.routing == "moge":
            return moge_routing(logits, self.moe.num_routing_groups, self.router_scale)
        return topk_routing(logits, self.moe.num_experts_per_tok, self.moe.norm_topk_prob)

    def start(self, x: torch.Tensor, accumulate_counts: bool = False) -> PendingMoE:
        """Route and hand the rows to the backend; the shared expert runs while they are out.

        `accumulate_counts`: this is a later micro-batch of the same step, so its rows
        add to the step's per-expert counts instead of replacing them.
        """
        weights, expert_ids = self.route(x)
        batch, dispatch = plan_dispatch(x, expert_ids, weights, self.moe.num_experts)
        if accumulate_counts and len(self.last_expert_counts) == len(batch.counts):
            self.last_expert_counts = [
                a + b for a, b in zip(self.last_expert_counts, batch.counts, strict=True)
            ]
        else:
            self.last_expert_counts = batch.counts
        handle = self.backend.submit(self.layer, batch)
        shared = None
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x)) if self.shared_expert_gate is not None else None
            shared = self.shared_expert(x, gate)
        return PendingMoE(handle, dispatch, shared, x)

    def finish(self, pending: PendingMoE) -> torch.Tensor:
        return combine(self.backend.wait(pending.handle), pending.dispatch, pending.x, pending.shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x))


@dataclass
class PendingMoE:
    """A sparse block's work between `start` and `finish`: expert rows in flight, shared output ready."""

    handle: object
    dispatch: Dispatch
    shared: torch.Tensor | None
    x: torch.Tensor
