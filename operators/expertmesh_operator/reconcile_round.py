"""One round of the operator: read the world, decide (round_plan.py, pure), write only what changed.

`reconcile_once(api, prometheus, settings, now)` is everything the operator does; the kopf
handlers (handlers.py) and the periodic tick only call it. This module is its I/O and nothing
else: it lists every Model in the operator's namespaces, puts our finalizer on those that lack
it, reads their checkpoints' config.json, the canary analyses, the RayService and the load of
the pools `round_plan.pools_to_measure` names, hands all that to `round_plan.decide`, and
writes the plan, in this order so that a failure leaves nothing half-said:

1. our finalizer onto Models that lack it (before their deployments exist, so a deletion
   always waits for cleanup);
2. the RayService's serveConfigV2, created when missing, patched only when it differs;
3. Model by Model: its status, only when it differs (rollout state and autoscaler memory live
   there, so a restarted operator resumes mid-rollout); then the events that status records
   (a failed write posts none: the next round decides again); then a consumed or meaningless
   rollout annotation removed;
4. our finalizer off deleted Models, once the RayService no longer serves them.

Same world, same time: zero writes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, Field

from expertmesh.errors import ExpertMeshError
from expertmesh.model.config import ModelConfig
from expertmesh_operator.admission import FinalizerChange, admit, finalizers_to_add
from expertmesh_operator.crd import ModelResource
from expertmesh_operator.kube import KubeError, KubernetesApi, ObjectEvent
from expertmesh_operator.operator_settings import OperatorSettings
from expertmesh_operator.pool_autoscale import PoolMetrics
from expertmesh_operator.rollout import AnalysisResult
from expertmesh_operator.round_plan import (
    ModelUpdate,
    Observations,
    Plan,
    PoolLoad,
    PoolQuery,
    decide,
    pools_to_measure,
)

logger = logging.getLogger(__name__)


class MetricsSource(Protocol):
    """What the loop asks Prometheus (prometheus.PrometheusClient)."""

    def pool_metrics(
        self, model: str, revision: str, pools: Sequence[str], now: float
    ) -> dict[str, PoolMetrics]: ...

    def canary_analysis(
        self, model: str, stable: str, canary: str, window_start: float, now: float
    ) -> AnalysisResult | None: ...


class LoopReport(BaseModel):
    """What one round wrote; `writes` is empty when nothing changed."""

    writes: list[str] = Field(default_factory=list)
    events: list[ObjectEvent] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


def reconcile_once(
    api: KubernetesApi, prometheus: MetricsSource | None, settings: OperatorSettings, now: float
) -> LoopReport:
    report = LoopReport()
    objects = _with_finalizers(api, api.list_models(settings.namespaces), report)
    admission = admit(objects)
    for entry in admission.entries:
        if entry.status_problem is not None:  # ours, unreadable after a schema change: start over
            logger.warning("ignoring the unreadable status of Model %s: %s", entry.name, entry.status_problem)
    models = admission.models
    observed = Observations(
        settings=settings,
        model_configs=_model_configs(models),
        analyses=_analyses(models, prometheus, now),
        serve_config=_serve_config(api, settings),
    )
    metrics = None
    if prometheus is not None:
        metrics = _pool_load(prometheus, pools_to_measure(objects, observed, now), now)
    return apply_plan(api, decide(objects, observed, metrics, now), report)


# ---- reads ------------------------------------------------------------------------------------


def _with_finalizers(
    api: KubernetesApi, objects: list[dict[str, Any]], report: LoopReport
) -> list[dict[str, Any]]:
    """Our finalizer onto every live Model lacking it; the objects as they now stand.

    This write comes before deciding, not in the plan, because its outcome decides who takes
    part: a Model whose finalizer could not be added is not deployed this round (its deletion
    would not wait for the cleanup), so it is left out of the list `decide` sees.
    """
    added: dict[tuple[str, str], list[str]] = {}
    failed: set[tuple[str, str]] = set()
    for change in finalizers_to_add(objects):
        key = (change.namespace, change.name)
        if _set_finalizers(api, change, f"finalizer {change.namespace}/{change.name}", report):
            added[key] = change.finalizers
        else:  # the Model moved or went away; the next round sees it again
            failed.add(key)
    out = []
    for obj in objects:
        key = (obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        if key in failed:
            continue
        if key in added:
            obj = {**obj, "metadata": {**obj["metadata"], "finalizers": added[key]}}
        out.append(obj)
    return out


def _model_configs(models: Sequence[ModelResource]) -> dict[str, ModelConfig]:
    """config.json of each checkpoint the operator can see (a shared path, a mounted PVC)."""
    found: dict[str, ModelConfig] = {}
    for path in sorted({m.spec.source.path() for m in models}):
        file = Path(path) / "config.json"
        try:
            if file.is_file():
                found[path] = ModelConfig.from_file(file)
        except (ExpertMeshError, OSError) as e:
            logger.warning("cannot read %s, checking the spec without it: %s", file, e)
    return found


def _analyses(
    models: Sequence[ModelResource], prometheus: MetricsSource | None, now: float
) -> dict[str, AnalysisResult]:
    out: dict[str, AnalysisResult] = {}
    for m in models:
        state = m.status.rollout if m.status else None
        if prometheus is None or state is None or state.phase != "Progressing":
            continue
        if state.stable is None or state.canary is None:
            continue
        start = state.step_started_at if state.step_started_at is not None else now
        try:
            result = prometheus.canary_analysis(
                m.served_name, state.stable.name, state.canary.name, start, now
            )
        except Exception as e:  # an analysis we could not get only makes the rollout wait
            logger.warning("canary analysis of %s failed; the rollout waits: %s", m.name, e)
            continue
        if result is not None:
            out[m.name] = result
    return out


def _serve_config(api: KubernetesApi, settings: OperatorSettings) -> dict[str, Any] | None:
    """The RayService's serveConfigV2 as it stands; None when there is no RayService."""
    existing = api.get_rayservice(settings.rayservice_namespace, settings.rayservice_name)
    if existing is None:
        return None
    return yaml.safe_load((existing.get("spec") or {}).get("serveConfigV2") or "{}")


def _pool_load(prometheus: MetricsSource, queries: Sequence[PoolQuery], now: float) -> PoolLoad:
    """Per Model, per Serve deployment; Prometheus labels the same pools "engine" and "experts-gN"."""
    out: dict[str, dict[str, PoolMetrics | None]] = {}
    for q in queries:
        try:
            answer = prometheus.pool_metrics(q.served_name, q.revision, sorted(q.pools), now)
        except Exception as e:  # failing data holds the pools, never scales them down
            failure = f"Prometheus query failed: {e}"
            answer = {label: PoolMetrics(sampled_at=now, error=failure) for label in q.pools}
        out.setdefault(q.model, {}).update({d: answer.get(label) for label, d in q.pools.items()})
    return out


# ---- writes -----------------------------------------------------------------------------------


def apply_plan(api: KubernetesApi, plan: Plan, report: LoopReport) -> LoopReport:
    """Make the plan's writes, in its order, into `report`.

    A RayService write that fails stops the round (the next one decides again from scratch); a
    failed status write skips that Model's events and annotation; a failed finalizer release
    skips its event; a failed event is only recorded: it is a record, not a decision.
    """
    if plan.rayservice is not None:
        meta = plan.rayservice.manifest["metadata"]
        where = f"{meta['namespace']}/{meta['name']}"
        if plan.rayservice.action == "create":
            api.create_rayservice(plan.rayservice.manifest)
            logger.info("created RayService %s", where)
        else:
            serve_config = plan.rayservice.manifest["spec"]["serveConfigV2"]
            api.patch_rayservice_serve_config(meta["namespace"], meta["name"], serve_config)
            logger.info("updated serveConfigV2 of RayService %s", where)
        report.writes.append(f"{plan.rayservice.action} RayService {where}")
    for update in plan.models:
        _write_model(api, update, report)
    for release in plan.releases:
        change = release.finalizers
        if _set_finalizers(api, change, f"release {change.namespace}/{change.name}", report):
            _post(api, release.event, report)
    return report


def _write_model(api: KubernetesApi, update: ModelUpdate, report: LoopReport) -> None:
    where = f"{update.namespace}/{update.name}"
    if update.status is not None:
        body = update.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            api.patch_model_status(update.namespace, update.name, body)
        except KubeError as e:  # the events wait with it: the next round decides again
            report.errors.append(str(e))
            return
        report.writes.append(f"status {where}")
    for event in update.events:
        _post(api, event, report)
    clear = update.clear_rollout_command
    if clear is None:
        return
    try:
        api.set_model_annotation(update.namespace, update.name, clear.annotation, None)
    except KubeError as e:
        report.errors.append(str(e))
        return
    report.writes.append(f"annotation {where}")
    if clear.warning is not None:
        _post(api, clear.warning, report)


def _set_finalizers(api: KubernetesApi, change: FinalizerChange, what: str, report: LoopReport) -> bool:
    """False when the write failed: the Model moved or went away, and the next round sees it again."""
    try:
        api.set_model_finalizers(change.namespace, change.name, change.finalizers, change.resource_version)
    except KubeError as e:
        report.errors.append(str(e))
        return False
    report.writes.append(what)
    return True


def _post(api: KubernetesApi, event: ObjectEvent, report: LoopReport) -> None:
    try:
        api.post_event(event)
    except KubeError as e:  # an Event is a record, not a decision: never stop the round for one
        report.errors.append(str(e))
        return
    report.events.append(event)
    report.writes.append(f"event {event.namespace}/{event.name} {event.reason}")
