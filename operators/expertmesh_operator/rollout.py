"""The canary rollout state machine, as one pure function.

`advance(state, spec, analysis, annotations, now)` returns the next state, the traffic
weights for the router and the events to post. The state is stored in the Model's status,
so an operator that restarts mid-rollout reads it back and carries on from the same step.

Phases: Stable (one revision) -> Progressing (stable + canary, canary traffic follows
the steps) -> Stable (promoted) | RolledBack (analysis failed) | Aborted (annotation).
A rejected revision is not retried until the spec changes again.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

from expertmesh_operator.crd import (
    ROLLOUT_ANNOTATION,
    CanaryAnalysis,
    ModelResourceSpec,
    RevisionRecord,
    RolloutState,
)
from expertmesh_operator.events import Event


class AnalysisResult(BaseModel):
    """Canary vs stable over [window_start, now], from Prometheus."""

    model_config = ConfigDict(frozen=True)

    window_start: float
    canary_requests: int
    canary_error_ratio: float
    stable_error_ratio: float
    canary_p95_seconds: float | None
    stable_p95_seconds: float | None


def revision_key(spec: ModelResourceSpec) -> str:
    """Hash of what defines a revision; replica counts, resources and targets are not part of it."""
    defining = spec.model_dump(
        mode="json", by_alias=True, include={"source", "version", "architecture", "expert_parallel", "limits"}
    )
    for volatile in ("replicasPerGroup", "minReplicasPerGroup", "maxReplicasPerGroup"):
        defining["expertParallel"].pop(volatile)
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def judge(analysis: AnalysisResult, thresholds: CanaryAnalysis) -> str | None:
    """Why the canary fails, or None when it passes."""
    excess = analysis.canary_error_ratio - analysis.stable_error_ratio
    if excess > thresholds.max_error_ratio:
        return (
            f"canary error ratio {analysis.canary_error_ratio:.4f} exceeds stable's "
            f"{analysis.stable_error_ratio:.4f} by more than {thresholds.max_error_ratio}"
        )
    canary_p95, stable_p95 = analysis.canary_p95_seconds, analysis.stable_p95_seconds
    if canary_p95 is not None and stable_p95 and canary_p95 / stable_p95 > thresholds.max_p95_latency_ratio:
        return (
            f"canary p95 latency {canary_p95:.3f}s is {canary_p95 / stable_p95:.2f}x stable's "
            f"{stable_p95:.3f}s, above {thresholds.max_p95_latency_ratio}x"
        )
    return None


def weights(state: RolloutState, spec: ModelResourceSpec) -> dict[str, int]:
    if state.stable is None:
        return {}
    if state.phase != "Progressing" or state.canary is None:
        return {state.stable.name: 100}
    share = spec.rollout.canary.steps[min(state.step_index, len(spec.rollout.canary.steps) - 1)]
    if share >= 100:
        return {state.canary.name: 100}
    return {state.stable.name: 100 - share, state.canary.name: share}


def _new_record(spec: ModelResourceSpec, key: str, taken: set[str]) -> RevisionRecord:
    # the version names the revision; a source change under the same version gets a suffix
    name = spec.version if spec.version not in taken else f"{spec.version[:55]}-{key[:6]}"
    return RevisionRecord(name=name, key=key, spec=spec)


def _promote(state: RolloutState, spec: ModelResourceSpec, message: str) -> tuple[RolloutState, list[Event]]:
    assert state.canary is not None
    canary = state.canary.model_copy(update={"spec": spec})
    new = RolloutState(phase="Stable", stable=canary, message=message)
    return new, [Event(reason="Promoted", message=f"revision {canary.name} promoted to stable: {message}")]


def _reject(state: RolloutState, phase: str, reason: str, message: str) -> tuple[RolloutState, list[Event]]:
    assert state.canary is not None and state.stable is not None
    new = RolloutState(phase=phase, stable=state.stable, rejected_key=state.canary.key, message=message)
    text = f"revision {state.canary.name} {message}; 100% traffic back to {state.stable.name}"
    return new, [Event(type="Warning", reason=reason, message=text)]


def advance(
    state: RolloutState | None,
    spec: ModelResourceSpec,
    analysis: AnalysisResult | None,
    annotations: dict[str, str],
    now: float,
) -> tuple[RolloutState, dict[str, int], list[Event]]:
    """One step of the state machine; calling it again with the same inputs changes nothing."""
    key = revision_key(spec)
    if state is None or state.stable is None:
        first = _new_record(spec, key, set())
        new = RolloutState(phase="Stable", stable=first, message=f"first revision {first.name}")
        return new, weights(new, spec), [Event(reason="RevisionCreated", message=new.message)]

    events: list[Event] = []
    if key == state.stable.key:
        if state.phase == "Progressing":
            # the spec went back to the stable revision: drop the canary
            state, events = _reject(
                state, "Aborted", "CanaryAbandoned", "abandoned: the spec returned to stable"
            )
        elif state.stable.spec != spec or state.phase != "Stable":
            # non-revision fields (replicas, targets) moved, or the spec returned to stable after
            # a rejected canary: the stable record follows the spec and the rollout is settled
            stable = state.stable.model_copy(update={"spec": spec})
            state = RolloutState(phase="Stable", stable=stable, message=state.message)
        return state, weights(state, spec), events

    if state.phase == "Progressing" and state.canary is not None and state.canary.key == key:
        state = state.model_copy(update={"canary": state.canary.model_copy(update={"spec": spec})})
        return _progress(state, spec, analysis, annotations, now)
    if key == state.rejected_key:
        return state, weights(state, spec), []  # stay on stable until the spec changes again

    if state.phase == "Progressing" and state.canary is not None:
        events.append(
            Event(reason="CanarySuperseded", message=f"revision {state.canary.name} replaced by a newer spec")
        )
    canary = _new_record(spec, key, {state.stable.name})
    state = RolloutState(
        phase="Progressing", stable=state.stable, canary=canary, step_index=0, step_started_at=now,
        message=f"canary {canary.name} started",
    )  # fmt: skip
    steps = spec.rollout.canary.steps
    if steps[0] >= 100:
        state, promoted = _promote(state, spec, "the strategy has no partial steps")
        return state, weights(state, spec), [*events, *promoted]
    events.append(
        Event(reason="CanaryStarted", message=f"revision {canary.name} gets {steps[0]}% of traffic")
    )
    return state, weights(state, spec), events


def _progress(
    state: RolloutState,
    spec: ModelResourceSpec,
    analysis: AnalysisResult | None,
    annotations: dict[str, str],
    now: float,
) -> tuple[RolloutState, dict[str, int], list[Event]]:
    command = annotations.get(ROLLOUT_ANNOTATION, "").strip().lower()
    if command == "promote":
        state, events = _promote(state, spec, f"manual promote ({ROLLOUT_ANNOTATION}=promote)")
        return state, weights(state, spec), events
    if command == "abort":
        state, events = _reject(state, "Aborted", "Aborted", f"aborted ({ROLLOUT_ANNOTATION}=abort)")
        return state, weights(state, spec), events

    canary = spec.rollout.canary
    started = state.step_started_at if state.step_started_at is not None else now
    if now - started < canary.pause_seconds:
        return state, weights(state, spec), []
    if (
        analysis is None
        or analysis.window_start < started
        or analysis.canary_requests < canary.analysis.min_requests
    ):
        return state, weights(state, spec), []  # nothing to judge this step by yet; wait
    failure = judge(analysis, canary.analysis)
    if failure is not None:
        state, events = _reject(state, "RolledBack", "RolledBack", f"failed analysis: {failure}")
        return state, weights(state, spec), events

    next_index = state.step_index + 1
    if next_index >= len(canary.steps) or canary.steps[next_index] >= 100:
        state, events = _promote(state, spec, f"passed analysis at {canary.steps[state.step_index]}%")
        return state, weights(state, spec), events
    state = state.model_copy(
        update={"step_index": next_index, "step_started_at": now, "message": f"step {next_index + 1}"}
    )
    share = canary.steps[next_index]
    assert state.canary is not None
    return (
        state,
        weights(state, spec),
        [Event(reason="CanaryStep", message=f"revision {state.canary.name} passed analysis; now {share}%")],
    )
