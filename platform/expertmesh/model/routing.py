"""Router decisions as pure functions: router logits in, (weights, expert ids) out.

Both return `weights` [T, k] in the logits' dtype and `expert_ids` [T, k] (int64).
"""

from __future__ import annotations

import torch


def topk_routing(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the k best (Qwen2/3-MoE, Mixtral); optionally renormalise."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), expert_ids


def moge_routing(
    logits: torch.Tensor, num_groups: int, router_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture of Grouped Experts (Pangu Pro MoE, arXiv 2505.21411).

    Softmax over all E experts, then the single best expert inside each of the
    `num_groups` equal, contiguous groups, so every token sends exactly one row to
    every group. The chosen weight is multiplied by the expert's learned
    `router_scale`; there is no renormalisation.
    """
    num_tokens, num_experts = logits.shape
    per_group = num_experts // num_groups
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, local_ids = probs.view(num_tokens, num_groups, per_group).max(dim=-1)
    expert_ids = local_ids + torch.arange(0, num_experts, per_group, device=logits.device)
    if router_scale is not None:
        weights = weights * router_scale.reshape(-1).float()[expert_ids]
    return weights.to(logits.dtype), expert_ids
