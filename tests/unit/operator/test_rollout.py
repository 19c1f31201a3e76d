from __future__ import annotations

from expertmesh_operator.crd import ROLLOUT_ANNOTATION, ModelResourceSpec, RolloutState
from expertmesh_operator.rollout import AnalysisResult, advance, revision_key

T0 = 1_000_000.0
PAUSE = 60


def spec(version="v1", checkpoint="/ckpt/a", steps=(10, 50, 100), **fields) -> ModelResourceSpec:
    return ModelResourceSpec.model_validate(
        {
            "source": {"checkpoint": checkpoint},
            "version": version,
            "rollout": {
                "canary": {"steps": list(steps), "pauseSeconds": PAUSE, "analysis": {"minRequests": 10}}
            },
            **fields,
        }
    )


def good(since: float, **override) -> AnalysisResult:
    values = dict(
        window_start=since,
        canary_requests=100,
        canary_error_ratio=0.0,
        stable_error_ratio=0.0,
        canary_p95_seconds=1.0,
        stable_p95_seconds=1.0,
    )
    return AnalysisResult(**(values | override))


def stable_v1() -> RolloutState:
    state, _, _ = advance(None, spec(), None, {}, T0)
    return state


def canary_v2(at: float = T0) -> RolloutState:
    state, _, _ = advance(stable_v1(), spec("v2"), None, {}, at)
    return state


def test_first_revision_is_stable_with_all_traffic():
    state, weights, events = advance(None, spec(), None, {}, T0)
    assert state.phase == "Stable" and state.stable.name == "v1"
    assert weights == {"v1": 100} and [e.reason for e in events] == ["RevisionCreated"]


def test_unchanged_spec_is_idempotent():
    state = stable_v1()
    assert advance(state, spec(), None, {}, T0 + 999) == (state, {"v1": 100}, [])
    state = canary_v2()
    assert advance(state, spec("v2"), None, {}, T0 + 1) == (state, {"v1": 90, "v2": 10}, [])


def test_replica_changes_do_not_make_a_revision():
    assert revision_key(spec()) == revision_key(
        spec(engineReplicas=3, expertParallel={"replicasPerGroup": 2})
    )
    state, weights, events = advance(stable_v1(), spec(engineReplicas=3), None, {}, T0)
    assert state.phase == "Stable" and weights == {"v1": 100} and events == []
    assert state.stable.spec.engine_replicas == 3


def test_version_change_starts_a_canary():
    state, weights, events = advance(stable_v1(), spec("v2"), None, {}, T0)
    assert state.phase == "Progressing" and state.canary.name == "v2" and state.step_started_at == T0
    assert weights == {"v1": 90, "v2": 10} and [e.reason for e in events] == ["CanaryStarted"]


def test_source_change_under_same_version_gets_a_distinct_name():
    state, weights, _ = advance(stable_v1(), spec(checkpoint="/ckpt/b"), None, {}, T0)
    assert state.canary.name.startswith("v1-") and state.canary.name != "v1"
    assert sorted(weights.values()) == [10, 90]


def test_waits_for_the_pause_and_for_fresh_analysis():
    state = canary_v2()
    for now, analysis in [
        (T0 + PAUSE - 1, good(T0)),  # pause not over
        (T0 + PAUSE, None),  # no analysis yet
        (T0 + PAUSE, good(T0 - 1)),  # window starts before this step
        (T0 + PAUSE, good(T0, canary_requests=5)),  # too few requests to judge
    ]:
        assert advance(state, spec("v2"), analysis, {}, now) == (state, {"v1": 90, "v2": 10}, [])


def test_steps_advance_then_promote():
    state = canary_v2()
    state, weights, events = advance(state, spec("v2"), good(T0), {}, T0 + PAUSE)
    assert (state.step_index, weights) == (1, {"v1": 50, "v2": 50}) and events[0].reason == "CanaryStep"
    assert state.step_started_at == T0 + PAUSE
    state, weights, events = advance(state, spec("v2"), good(T0 + PAUSE), {}, T0 + 2 * PAUSE)
    assert state.phase == "Stable" and state.stable.name == "v2" and state.canary is None
    assert weights == {"v2": 100} and events[0].reason == "Promoted"


def test_failed_error_analysis_rolls_back():
    bad = good(T0, canary_error_ratio=0.2, stable_error_ratio=0.01)
    state, weights, events = advance(canary_v2(), spec("v2"), bad, {}, T0 + PAUSE)
    assert state.phase == "RolledBack" and state.stable.name == "v1" and state.canary is None
    assert weights == {"v1": 100}
    assert (
        events[0].type == "Warning"
        and events[0].reason == "RolledBack"
        and "error ratio" in events[0].message
    )
    # the rejected revision is not retried while the spec still names it
    assert advance(state, spec("v2"), good(T0), {}, T0 + 10 * PAUSE) == (state, {"v1": 100}, [])


def test_failed_latency_analysis_rolls_back():
    slow = good(T0, canary_p95_seconds=2.0, stable_p95_seconds=1.0)
    state, _, events = advance(canary_v2(), spec("v2"), slow, {}, T0 + PAUSE)
    assert state.phase == "RolledBack" and "p95 latency" in events[0].message


def test_new_spec_after_rollback_starts_a_new_canary():
    bad = good(T0, canary_error_ratio=0.5)
    state, _, _ = advance(canary_v2(), spec("v2"), bad, {}, T0 + PAUSE)
    state, weights, _ = advance(state, spec("v3"), None, {}, T0 + 2 * PAUSE)
    assert state.phase == "Progressing" and state.canary.name == "v3" and weights == {"v1": 90, "v3": 10}


def test_returning_to_stable_spec_settles():
    state, _, _ = advance(canary_v2(), spec("v2"), good(T0, canary_error_ratio=0.5), {}, T0 + PAUSE)
    state, weights, _ = advance(state, spec("v1"), None, {}, T0 + 2 * PAUSE)
    assert state.phase == "Stable" and weights == {"v1": 100}
    state, weights, events = advance(canary_v2(), spec("v1"), None, {}, T0 + 1)
    assert state.phase == "Aborted" and weights == {"v1": 100} and events[0].reason == "CanaryAbandoned"


def test_manual_promote_and_abort():
    state, weights, events = advance(canary_v2(), spec("v2"), None, {ROLLOUT_ANNOTATION: "promote"}, T0 + 1)
    assert state.phase == "Stable" and weights == {"v2": 100} and events[0].reason == "Promoted"
    again = advance(state, spec("v2"), None, {ROLLOUT_ANNOTATION: "promote"}, T0 + 2)
    assert again == (state, {"v2": 100}, [])  # idempotent once promoted

    state, weights, events = advance(canary_v2(), spec("v2"), None, {ROLLOUT_ANNOTATION: "abort"}, T0 + 1)
    assert state.phase == "Aborted" and weights == {"v1": 100} and events[0].reason == "Aborted"
    assert advance(state, spec("v2"), None, {ROLLOUT_ANNOTATION: "abort"}, T0 + 2) == (state, {"v1": 100}, [])


def test_newer_spec_supersedes_a_running_canary():
    state, weights, events = advance(canary_v2(), spec("v3"), None, {}, T0 + 5)
    assert state.canary.name == "v3" and state.step_index == 0 and weights == {"v1": 90, "v3": 10}
    assert [e.reason for e in events] == ["CanarySuperseded", "CanaryStarted"]


def test_single_step_strategy_promotes_at_once():
    state, _, _ = advance(None, spec(steps=[100]), None, {}, T0)
    state, weights, events = advance(state, spec("v2", steps=[100]), None, {}, T0)
    assert state.phase == "Stable" and weights == {"v2": 100} and events[0].reason == "Promoted"


def test_restart_mid_rollout_resumes_from_status():
    state, _, _ = advance(canary_v2(), spec("v2"), good(T0), {}, T0 + PAUSE)  # at 50%
    stored = state.model_dump(mode="json", by_alias=True, exclude_none=True)  # written to status
    restored = RolloutState.model_validate(stored)  # read back by a fresh operator
    assert restored == state
    assert advance(restored, spec("v2"), None, {}, T0 + PAUSE + 1)[1] == {"v1": 50, "v2": 50}
    final, weights, _ = advance(restored, spec("v2"), good(T0 + PAUSE), {}, T0 + 2 * PAUSE)
    assert final.phase == "Stable" and weights == {"v2": 100}
