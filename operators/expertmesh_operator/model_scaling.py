"""Autoscaling for one whole Model, as a pure function over the per-pool policy in pool_autoscale.py.

`scale_model` knows a Model's pools (an engine and, when disaggregated, one pool per expert
group, for every deployed revision), their bounds from the spec, that MoGE expert pools scale
together, and where the autoscaler's memory lives (the Model's status, so the stabilisation
windows survive an operator restart). It returns the replicas to deploy, the new memory, the
ScalingActive condition and the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from expertmesh.serve_layout import engine_deployment_name, expert_deployment_name
from expertmesh_operator.crd import AutoscalingStatus, ModelResource, ScaleRecommendation
from expertmesh_operator.events import Event
from expertmesh_operator.pool_autoscale import (
    PoolMetrics,
    ReplicaBounds,
    ScaleDecision,
    desired_replicas,
    pool_decisions,
    remember,
)


class ModelScaling(BaseModel):
    model_config = ConfigDict(frozen=True)

    replicas: dict[str, int]  # pool -> replicas; empty: the spec's counts apply
    autoscaling: AutoscalingStatus | None
    condition: tuple[str, str, str]  # ScalingActive (status, reason, message)
    events: list[Event]


def _compact(history: Sequence[ScaleRecommendation]) -> list[ScaleRecommendation]:
    """One entry per recommended count, at its latest time.

    Lossless for the windows: scale-up takes the smallest and scale-down the largest count
    recommended within a window, and a count is within it iff its latest time is. So the status
    stays small however long the windows are.
    """
    latest: dict[int, float] = {}
    for r in history:
        latest[r.replicas] = max(r.at, latest.get(r.replicas, r.at))
    return [ScaleRecommendation(at=at, replicas=n) for n, at in sorted(latest.items(), key=lambda kv: kv[1])]


def _expert_pools(served: str, revision: str, pools: Mapping[str, int]) -> list[str]:
    found = []
    while (pool := expert_deployment_name(served, revision, len(found))) in pools:
        found.append(pool)
    return found


def scale_model(
    model: ModelResource,
    revisions: Sequence[str],
    pools: Mapping[str, int],
    metrics: Mapping[str, PoolMetrics | None] | None,
    moge: bool,
    now: float,
) -> ModelScaling:
    """`pools`: the Model's deployments this round with the spec's replicas; `metrics` None: no Prometheus."""
    spec = model.spec
    previous = model.status.autoscaling if model.status else None
    was = model.status.condition("ScalingActive") if model.status else None
    if not spec.autoscaling.enabled:
        condition = ("False", "Disabled", "autoscaling.enabled is false: replicas follow the spec")
    elif metrics is None:
        condition = ("False", "NoPrometheus", "the operator has no Prometheus URL: replicas follow the spec")
    else:
        condition = None
    if condition is not None:
        events = [] if was is not None and was.reason == condition[1] else [_condition_event(condition)]
        return ModelScaling(replicas={}, autoscaling=None, condition=condition, events=events)

    deployed = model.status.replicas_per_pool if model.status else {}
    current = {pool: deployed.get(pool, n) for pool, n in pools.items()}
    histories = {pool: list(h) for pool, h in (previous.history if previous else {}).items()}
    targets = spec.autoscaling
    engine_bounds = ReplicaBounds(min=spec.min_engine_replicas, max=spec.max_engine_replicas)
    ep = spec.expert_parallel
    expert_bounds = ReplicaBounds(min=ep.min_replicas_per_group, max=ep.max_replicas_per_group)

    decisions: dict[str, ScaleDecision] = {}
    events: list[Event] = []
    for revision in revisions:
        engine = engine_deployment_name(model.served_name, revision)
        if engine in current:
            decisions[engine] = desired_replicas(
                current[engine], metrics.get(engine), targets, engine_bounds, histories.get(engine, ()), now
            )
            events += _scale_events(f"engine pool {engine}", current[engine], decisions[engine])
        experts = _expert_pools(model.served_name, revision, current)
        group = pool_decisions(
            {p: current[p] for p in experts}, metrics, targets, expert_bounds, histories, now, moge
        )
        decisions.update(group)
        if moge and experts:
            # one decision for all groups: say it once
            what = f"expert pools of {model.served_name}@{revision} ({len(experts)} MoGE groups, together)"
            events += _scale_events(what, max(current[p] for p in experts), group[experts[0]])
        else:
            for pool in experts:
                events += _scale_events(f"expert pool {pool}", current[pool], group[pool])

    history = {
        pool: _compact(remember(histories.get(pool, ()), decision, now, targets))
        for pool, decision in decisions.items()
    }
    held = sorted(pool for pool, d in decisions.items() if d.hold)
    status = AutoscalingStatus(history={p: h for p, h in sorted(history.items()) if h}, held_pools=held)
    if held:
        condition = (
            "False",
            "MetricsUnavailable",
            f"holding {len(held)} pool(s) at their replicas, never scaling down without data: {', '.join(held)}",
        )
        newly = [p for p in held if previous is None or p not in previous.held_pools]
        if newly:
            reasons = sorted({decisions[p].reason for p in newly})
            events.append(
                Event(
                    type="Warning",
                    reason="AutoscalingHeld",
                    message=f"{', '.join(newly)}: {'; '.join(reasons)}",
                )
            )
    else:
        condition = ("True", "ValidMetrics", "every pool has fresh metrics")
        if was is None or was.reason != "ValidMetrics":
            events.append(_condition_event(condition))
    return ModelScaling(
        replicas={pool: d.replicas for pool, d in decisions.items()},
        autoscaling=status,
        condition=condition,
        events=events,
    )


def _scale_events(what: str, current: int, decision: ScaleDecision) -> list[Event]:
    if decision.replicas == current:
        return []
    reason = "ScaledUp" if decision.replicas > current else "ScaledDown"
    return [Event(reason=reason, message=f"{what}: {decision.reason}")]


def _condition_event(condition: tuple[str, str, str]) -> Event:
    return Event(reason=f"Autoscaling{condition[1]}", message=condition[2])
