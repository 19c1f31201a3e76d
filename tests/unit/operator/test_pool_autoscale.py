from __future__ import annotations

import math

from expertmesh_operator.crd import AutoscalingTargets
from expertmesh_operator.pool_autoscale import (
    PoolMetrics,
    Recommendation,
    ReplicaBounds,
    desired_replicas,
    pool_decisions,
    remember,
)

NOW = 10_000.0
TARGETS = AutoscalingTargets(
    queueDepthPerReplica=4,
    ongoingRequestsPerReplica=8,
    tokensPerSecondPerReplica=100,
    tpotP95Seconds=0.05,
    tolerance=0.1,
    scaleUpStabilizationSeconds=0,
    scaleDownStabilizationSeconds=300,
    maxStepReplicas=4,
    metricsMaxAgeSeconds=60,
)
BOUNDS = ReplicaBounds(min=1, max=10)


def metrics(**values) -> PoolMetrics:
    return PoolMetrics(sampled_at=NOW - 5, **values)


def decide(current, m, history=(), targets=TARGETS, bounds=BOUNDS):
    return desired_replicas(current, m, targets, bounds, list(history), NOW)


def test_scale_up_by_ratio():
    d = decide(2, metrics(queue_depth=16))  # 8 per replica vs 4 -> 2x
    assert (d.replicas, d.hold) == (4, False) and "queue depth" in d.reason and "scale up" in d.reason


def test_max_over_signals_wins():
    d = decide(2, metrics(queue_depth=8, ongoing_requests=16, tokens_per_second=600, tpot_p95_seconds=0.05))
    assert d.replicas == 6 and "tokens/s" in d.reason  # tokens/s ratio 3 beats the others


def test_latency_ratio_is_not_divided_by_replicas():
    assert decide(4, metrics(tpot_p95_seconds=0.075)).replicas == 6


def test_within_tolerance_keeps():
    d = decide(4, metrics(queue_depth=17))  # 1.0625x
    assert d.replicas == 4 and "tolerance" in d.reason


def test_scale_down_waits_for_the_window():
    low = metrics(queue_depth=4)  # recommends 1
    history = [Recommendation(at=NOW - 200, replicas=4)]
    d = decide(4, low, history)
    assert d.replicas == 4 and d.recommendation == 1 and "recommended up to 4" in d.reason
    old = [Recommendation(at=NOW - 400, replicas=4), Recommendation(at=NOW - 100, replicas=2)]
    assert decide(4, low, old).replicas == 2  # max recommendation in the window


def test_scale_up_stabilization_takes_the_smallest_recent_recommendation():
    targets = TARGETS.model_copy(update={"scale_up_stabilization_seconds": 60})
    history = [Recommendation(at=NOW - 30, replicas=3)]
    assert decide(2, metrics(queue_depth=32), history, targets).replicas == 3
    assert decide(2, metrics(queue_depth=32), [], targets).replicas == 6


def test_bounded_step():
    assert decide(1, metrics(queue_depth=100)).replicas == 5  # wants 10, step 4
    assert decide(10, metrics(queue_depth=0, tpot_p95_seconds=0.0)).replicas == 6


def test_clamped_to_bounds():
    bounds = ReplicaBounds(min=2, max=3)
    assert decide(2, metrics(queue_depth=100), bounds=bounds).replicas == 3
    assert decide(2, metrics(queue_depth=0), bounds=bounds).replicas == 2


def test_hold_on_missing_stale_failing_and_unusable():
    cases = {
        "no metrics": None,
        "stale": PoolMetrics(sampled_at=NOW - 61, queue_depth=0),
        "query failed: connection refused": PoolMetrics(sampled_at=NOW, error="connection refused"),
        "no usable signal": metrics(queue_depth=math.nan),
    }
    for why, m in cases.items():
        d = decide(5, m)
        assert d.hold and d.replicas == 5 and why in d.reason, (why, d)
        assert d.recommendation is None


def test_hold_still_respects_spec_bounds():
    assert decide(1, None, bounds=ReplicaBounds(min=2, max=4)).replicas == 2
    assert decide(6, None, bounds=ReplicaBounds(min=2, max=4)).replicas == 4


def test_remember_prunes_old_entries():
    history = [Recommendation(at=NOW - 1000, replicas=9), Recommendation(at=NOW - 10, replicas=3)]
    d = decide(3, metrics(queue_depth=12))
    assert [r.replicas for r in remember(history, d, NOW, TARGETS)] == [3, 3]
    assert remember(history, decide(3, None), NOW, TARGETS) == history[1:]


def test_moge_pools_scale_together_from_the_most_loaded():
    pools = {f"g{i}": 2 for i in range(4)}
    load = {f"g{i}": metrics(queue_depth=8) for i in range(4)} | {"g2": metrics(queue_depth=24)}
    decisions = pool_decisions(pools, load, TARGETS, BOUNDS, {}, NOW, scale_together=True)
    assert {d.replicas for d in decisions.values()} == {6}


def test_moge_pools_hold_together_when_one_group_is_missing():
    pools = {"g0": 2, "g1": 2}
    decisions = pool_decisions(pools, {"g0": metrics(queue_depth=0)}, TARGETS, BOUNDS, {}, NOW, True)
    assert all(d.hold and d.replicas == 2 for d in decisions.values())


def test_topk_pools_scale_one_by_one():
    pools = {"g0": 2, "g1": 2, "g2": 2}
    load = {"g0": metrics(queue_depth=24), "g1": metrics(queue_depth=8)}
    decisions = pool_decisions(pools, load, TARGETS, BOUNDS, {}, NOW, scale_together=False)
    assert decisions["g0"].replicas == 6 and decisions["g1"].replicas == 2
    assert decisions["g2"].hold
