"""Replica decisions per pool, in the manner of the Kubernetes HPA.

Each signal gives a ratio observed/target; the largest wins. Inside the tolerance
band nothing changes. Recommendations are remembered: scaling up takes the
*smallest* recommendation of the (short) up window, scaling down the *largest* of
the (long) down window, so one quiet sample never drops capacity. Steps are bounded
and the result is clamped to [min, max]. Missing, stale or failing metrics hold:
never scale down on data we do not have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from expertmesh_operator.crd import AutoscalingTargets
from expertmesh_operator.crd import ScaleRecommendation as Recommendation  # stored in Model status


class PoolMetrics(BaseModel):
    """A pool's load as Prometheus reported it (pool totals, not per replica)."""

    model_config = ConfigDict(frozen=True)

    sampled_at: float
    queue_depth: float | None = None
    ongoing_requests: float | None = None
    tokens_per_second: float | None = None
    tpot_p95_seconds: float | None = None
    error: str | None = Field(None, description="why the query failed, when it did")


class ReplicaBounds(BaseModel):
    model_config = ConfigDict(frozen=True)

    min: int = Field(..., ge=1)
    max: int = Field(..., ge=1)


class ScaleDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    replicas: int
    reason: str
    hold: bool = False
    recommendation: int | None = Field(None, description="raw recommendation to remember in the history")


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def _ratios(current: int, metrics: PoolMetrics, targets: AutoscalingTargets) -> dict[str, float]:
    replicas = max(current, 1)
    per_replica = {
        "queue depth": (metrics.queue_depth, targets.queue_depth_per_replica),
        "ongoing requests": (metrics.ongoing_requests, targets.ongoing_requests_per_replica),
        "tokens/s": (metrics.tokens_per_second, targets.tokens_per_second_per_replica),
    }
    ratios = {
        name: observed / replicas / target
        for name, (observed, target) in per_replica.items()
        if target is not None and _usable(observed)
    }
    # latency is not additive over replicas: the ratio is the observed/target itself
    if targets.tpot_p95_seconds is not None and _usable(metrics.tpot_p95_seconds):
        ratios["TPOT p95"] = metrics.tpot_p95_seconds / targets.tpot_p95_seconds
    return ratios


def _hold_reason(metrics: PoolMetrics | None, targets: AutoscalingTargets, now: float) -> str | None:
    if metrics is None:
        return "no metrics for this pool"
    if metrics.error:
        return f"metrics query failed: {metrics.error}"
    age = now - metrics.sampled_at
    if age > targets.metrics_max_age_seconds:
        return f"metrics are stale ({age:.0f}s old, limit {targets.metrics_max_age_seconds}s)"
    return None


def _clamp(replicas: int, bounds: ReplicaBounds) -> int:
    return min(max(replicas, bounds.min), bounds.max)


def desired_replicas(
    current: int,
    metrics: PoolMetrics | None,
    targets: AutoscalingTargets,
    bounds: ReplicaBounds,
    history: Sequence[Recommendation],
    now: float,
) -> ScaleDecision:
    hold = _hold_reason(metrics, targets, now)
    ratios = {} if hold or metrics is None else _ratios(current, metrics, targets)
    if hold is None and not ratios:
        hold = "no usable signal among the configured targets"
    if hold is not None:
        # bounds from the spec still apply; metrics never lower the count
        replicas = _clamp(current, bounds)
        return ScaleDecision(replicas=replicas, reason=f"holding at {replicas}: {hold}", hold=True)

    signal, ratio = max(ratios.items(), key=lambda kv: kv[1])
    if abs(ratio - 1.0) <= targets.tolerance:
        recommendation = current
        why = f"{signal} at {ratio:.2f}x target, within tolerance {targets.tolerance}"
    else:
        recommendation = math.ceil(max(current, 1) * ratio - 1e-9)
        why = f"{signal} at {ratio:.2f}x target"
    recommendation = _clamp(recommendation, bounds)

    up_window = [r.replicas for r in history if now - r.at <= targets.scale_up_stabilization_seconds]
    down_window = [r.replicas for r in history if now - r.at <= targets.scale_down_stabilization_seconds]
    up_limit = min([*up_window, recommendation])
    down_limit = max([*down_window, recommendation])
    if current < up_limit:
        target = min(up_limit, current + targets.max_step_replicas)
    elif current > down_limit:
        target = max(down_limit, current - targets.max_step_replicas)
    else:
        target = current
    target = _clamp(target, bounds)

    if target > current:
        reason = f"scale up {current} -> {target}: {why}"
    elif target < current:
        reason = f"scale down {current} -> {target}: {why}"
    elif recommendation < current:
        reason = (
            f"keep {current}: {why}, recommends {recommendation}, but the last "
            f"{targets.scale_down_stabilization_seconds}s recommended up to {down_limit}"
        )
    else:
        reason = f"keep {current}: {why}"
    return ScaleDecision(replicas=target, reason=reason, recommendation=recommendation)


def remember(
    history: Sequence[Recommendation], decision: ScaleDecision, now: float, targets: AutoscalingTargets
) -> list[Recommendation]:
    """The history to pass next time: this recommendation added, entries outside both windows dropped."""
    keep = max(targets.scale_up_stabilization_seconds, targets.scale_down_stabilization_seconds)
    kept = [r for r in history if now - r.at <= keep]
    if decision.recommendation is not None:
        kept.append(Recommendation(at=now, replicas=decision.recommendation))
    return kept


def _combined(metrics: Sequence[PoolMetrics | None]) -> PoolMetrics | None:
    """The most loaded view over pools; any missing or failing pool makes the whole unknown."""
    if not metrics or any(m is None for m in metrics):
        return None
    present = [m for m in metrics if m is not None]
    failed = list(dict.fromkeys(m.error for m in present if m.error))  # one Prometheus failure, said once
    oldest = min(m.sampled_at for m in present)

    def most(field: str) -> float | None:
        values = [getattr(m, field) for m in present if _usable(getattr(m, field))]
        return max(values) if values else None

    return PoolMetrics(
        sampled_at=oldest,
        queue_depth=most("queue_depth"),
        ongoing_requests=most("ongoing_requests"),
        tokens_per_second=most("tokens_per_second"),
        tpot_p95_seconds=most("tpot_p95_seconds"),
        error="; ".join(failed) if failed else None,
    )


def pool_decisions(
    current: Mapping[str, int],
    metrics: Mapping[str, PoolMetrics | None],
    targets: AutoscalingTargets,
    bounds: ReplicaBounds,
    histories: Mapping[str, Sequence[Recommendation]],
    now: float,
    scale_together: bool,
) -> dict[str, ScaleDecision]:
    """Decisions for a model's expert pools.

    MoGE (`scale_together`): every group gets an equal share of tokens by construction, so
    one decision from the most loaded group applies to all and the pools stay symmetric.
    Top-k: each pool by its own load.
    """
    if not current:
        return {}
    if not scale_together:
        return {
            pool: desired_replicas(n, metrics.get(pool), targets, bounds, histories.get(pool, ()), now)
            for pool, n in current.items()
        }
    pools = sorted(current)
    shared_history = [r for pool in pools for r in histories.get(pool, ())]
    decision = desired_replicas(
        max(current.values()),
        _combined([metrics.get(pool) for pool in pools]),
        targets,
        bounds,
        shared_history,
        now,
    )
    return dict.fromkeys(pools, decision)
