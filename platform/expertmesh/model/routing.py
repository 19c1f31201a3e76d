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


def noaux_tc_routing(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    num_groups: int,
    topk_group: int,
    k: int,
    normalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited routing of the DeepSeek-V3 family (`topk_method: noaux_tc`; also Kimi K2
    and openPangu-Ultra-MoE).

    Sigmoid scores. For choosing only, each expert's score gains its `e_score_correction_bias`
    (the load-balancing term trained instead of an auxiliary loss). The experts split into
    `num_groups` equal contiguous groups, a group scoring the sum of its two best; each token
    keeps its `topk_group` best groups and takes the k best experts inside them. The weights
    are the unbiased scores of those experts, renormalised when `normalize`, then times
    `scaling_factor`. So each token's rows reach at most `topk_group` groups.
    """
    num_tokens, num_experts = logits.shape
    per_group = num_experts // num_groups
    scores = torch.sigmoid(logits.float())
    biased = scores + correction_bias.float()
    group_scores = (
        biased.view(num_tokens, num_groups, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    )
    kept_groups = group_scores.topk(topk_group, dim=-1).indices
    in_kept_group = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    allowed = in_kept_group.repeat_interleave(per_group, dim=1)
    expert_ids = biased.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * scaling_factor).to(logits.dtype), expert_ids
