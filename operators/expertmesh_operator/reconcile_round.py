"""One round of the operator: read the world, run the pure decisions, write only what changed.

`reconcile_once(api, prometheus, settings, now)` is everything the operator does; the kopf
handlers (handlers.py) and the periodic tick only call it. It reads every Model in the
operator's namespaces, asks Prometheus for canary analyses and pool load, runs
`reconcile.reconcile` over ALL Models (one RayService holds them all) and `scaling.scale_model`
per Model, then writes, in this order so that a failure leaves nothing half-said:

1. our finalizer onto Models that lack it (before their deployments exist, so a deletion
   always waits for cleanup);
2. the RayService's serveConfigV2, created when missing, patched only when it differs;
3. each Model's status, only when it differs (rollout state and autoscaler memory live there,
   so a restarted operator resumes mid-rollout);
4. a consumed or meaningless rollout annotation removed;
5. the decisions' Events, after the status that records them (a failed write re-decides);
6. our finalizer off deleted Models, once the RayService no longer serves them.

Same world, same time: zero writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expertmesh.errors import ExpertMeshError
from expertmesh.model.config import ModelConfig
from expertmesh.serve_layout import ENGINE_POOL, engine_deployment_name, expert_deployment_name, expert_pool
from expertmesh_operator.crd import (
    FINALIZER,
    ROLLOUT_ANNOTATION,
    ModelResource,
    ModelResourceSpec,
    ModelResourceStatus,
    RolloutState,
)
from expertmesh_operator.events import Event
from expertmesh_operator.kube import KubeError, KubernetesApi, ObjectEvent
from expertmesh_operator.model_scaling import ModelScaling, scale_model
from expertmesh_operator.pool_autoscale import PoolMetrics
from expertmesh_operator.reconcile import (
    ObservedState,
    _condition,
    rayservice_manifest,
    reconcile,
)
from expertmesh_operator.rollout import AnalysisResult

logger = logging.getLogger(__name__)

ROLLOUT_COMMANDS = ("promote", "abort")


class MetricsSource(Protocol):
    """What the loop asks Prometheus (prometheus.PrometheusClient)."""

    def pool_metrics(
        self, model: str, revision: str, pools: Sequence[str], now: float
    ) -> dict[str, PoolMetrics]: ...

    def canary_analysis(
        self, model: str, stable: str, canary: str, window_start: float, now: float
    ) -> AnalysisResult | None: ...


def default_ray_cluster_config(image: str = "expertmesh/runtime:0.1.0") -> dict[str, Any]:
    """A one-head Ray cluster with the autoscaler on, for when no RayService exists yet.

    The Helm chart normally creates the RayService with the release's head and worker groups;
    the operator then only patches its serveConfigV2.
    """
    return {
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [{"name": "ray-head", "image": image}]}},
        },
    }


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    namespaces: tuple[str, ...] | None = Field(("default",), description="None: every namespace")
    rayservice_name: str = Field("expertmesh", min_length=1, max_length=63)
    rayservice_namespace: str = Field("default", min_length=1, max_length=63)
    ray_cluster_config: dict[str, Any] = Field(default_factory=default_ray_cluster_config)
    interval_s: float = Field(30.0, gt=0)
    endpoint: str | None = Field(None, description="default: the RayService's Serve service")

    @property
    def serve_endpoint(self) -> str:
        # KubeRay names the Serve service <rayservice>-serve-svc
        svc = f"{self.rayservice_name}-serve-svc.{self.rayservice_namespace}.svc"
        return self.endpoint or f"http://{svc}:8000"


class LoopReport(BaseModel):
    """What one round wrote; `writes` is empty when nothing changed."""

    writes: list[str] = Field(default_factory=list)
    events: list[ObjectEvent] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class _Entry(BaseModel):
    """A Model as this round sees it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    obj: dict[str, Any]
    status: ModelResourceStatus | None  # as stored
    model: ModelResource | None  # None: nothing to deploy from (unreadable spec, no history)
    problem: str | None = None  # why it is blocked: unreadable spec, or its name is taken

    @property
    def namespace(self) -> str:
        return self.obj["metadata"].get("namespace", "default")

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "spec"
    return f"{where}: {first['msg']} ({exc.error_count()} problem(s) in all)"


def _parse(obj: dict[str, Any]) -> _Entry:
    meta = obj["metadata"]
    raw_status = obj.get("status") or {}
    try:
        status = ModelResourceStatus.model_validate(raw_status) if raw_status else None
    except ValidationError as e:
        # our own writing, unreadable after a schema change: start over rather than stop
        logger.warning("ignoring the unreadable status of Model %s: %s", meta["name"], _describe(e))
        status = None
    try:
        spec = ModelResourceSpec.model_validate(obj.get("spec") or {})
        problem = None
    except ValidationError as e:
        problem = f"the spec cannot be read: {_describe(e)}"
        stable = status.rollout.stable if status and status.rollout else None
        if stable is None:
            return _Entry(obj=obj, status=status, model=None, problem=problem)
        spec = stable.spec  # the stable revision keeps serving, frozen
    model = ModelResource(
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        generation=meta.get("generation", 1),
        annotations=meta.get("annotations") or {},
        spec=spec,
        status=status,
    )
    return _Entry(obj=obj, status=status, model=model, problem=problem)


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


def _analyses(models: Sequence[ModelResource], prometheus: MetricsSource | None, now: float) -> dict:
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


def _revisions(model: ModelResource, state: RolloutState | None, pools: Mapping[str, int]) -> list[str]:
    if state is None:
        return []
    names = [r.name for r in (state.stable, state.canary) if r is not None]
    return [n for n in names if engine_deployment_name(model.served_name, n) in pools]


def _pool_metrics(
    prometheus: MetricsSource,
    model: ModelResource,
    revisions: Sequence[str],
    pools: Mapping[str, int],
    now: float,
) -> dict[str, PoolMetrics | None]:
    """Per Serve deployment; Prometheus labels the same pools "engine" and "experts-gN"."""
    out: dict[str, PoolMetrics | None] = {}
    for revision in revisions:
        labels = {ENGINE_POOL: engine_deployment_name(model.served_name, revision)}
        g = 0
        while (deployment := expert_deployment_name(model.served_name, revision, g)) in pools:
            labels[expert_pool(g)] = deployment
            g += 1
        try:
            answer = prometheus.pool_metrics(model.served_name, revision, sorted(labels), now)
        except Exception as e:  # failing data holds the pools, never scales them down
            answer = {
                label: PoolMetrics(sampled_at=now, error=f"Prometheus query failed: {e}") for label in labels
            }
        out.update({deployment: answer.get(label) for label, deployment in labels.items()})
    return out


def _blocked_status(entry: _Entry, now: float) -> ModelResourceStatus:
    """Status of a Model that cannot take part: Degraded, with the reason, nothing deployed."""
    prev = entry.status
    return ModelResourceStatus(
        conditions=[
            _condition(prev, "Ready", "False", "NotDeployed", "see the Degraded condition", now),
            _condition(prev, "Progressing", "False", "Settled", "", now),
            _condition(prev, "Degraded", "True", "InvalidSpec", entry.problem or "", now),
        ],
        observed_generation=entry.obj["metadata"].get("generation", 1),
        ready="False",
    )


def reconcile_once(
    api: KubernetesApi, prometheus: MetricsSource | None, settings: OperatorSettings, now: float
) -> LoopReport:
    report = LoopReport()
    objects = sorted(
        api.list_models(settings.namespaces),
        key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
    )
    live = [o for o in objects if not o["metadata"].get("deletionTimestamp")]
    deleting = [o for o in objects if o["metadata"].get("deletionTimestamp")]

    # 1. finalizers first: a Model is deployed only once its deletion is sure to clean up
    entries: list[_Entry] = []
    for obj in live:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            try:
                api.set_model_finalizers(
                    meta.get("namespace", "default"),
                    meta["name"],
                    [*finalizers, FINALIZER],
                    meta["resourceVersion"],
                )
            except KubeError as e:  # the Model moved or went away; the next round sees it again
                report.errors.append(str(e))
                continue
            report.writes.append(f"finalizer {meta.get('namespace')}/{meta['name']}")
        entries.append(_parse(obj))

    # one serve config for all namespaces: a Model name may be deployed once
    taken: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if entry.name in taken:
            problem = f"a Model named {entry.name!r} is already deployed from namespace {taken[entry.name]}"
            entries[i] = entry.model_copy(update={"model": None, "problem": problem})
        elif entry.model is not None:
            taken[entry.name] = entry.namespace
    deployable = {e.name: e for e in entries if e.model is not None}
    models = [e.model for e in deployable.values() if e.model is not None]

    # the pure decisions: rollout first, then autoscaling on the pools the rollout left
    states = {m.name: (m.status.rollout if m.status else None) for m in models}
    observed = ObservedState(
        model_configs=_model_configs(models),
        analyses=_analyses(models, prometheus, now),
        endpoint=settings.serve_endpoint,
    )
    first = reconcile(models, observed, states, now)
    scaling: dict[str, ModelScaling] = {}
    for m in models:
        pools = first.statuses[m.name].replicas_per_pool
        revisions = _revisions(m, first.statuses[m.name].rollout, pools)
        metrics = None if prometheus is None else _pool_metrics(prometheus, m, revisions, pools, now)
        cfg = observed.model_configs.get(m.spec.source.path())
        moge = cfg is not None and cfg.moe is not None and cfg.moe.routing == "moge"
        scaling[m.name] = scale_model(m, revisions, pools, metrics, moge, now)
    chosen = {name: s.replicas for name, s in scaling.items() if s.replicas}
    result = (
        reconcile(models, observed.model_copy(update={"replicas": chosen}), states, now) if chosen else first
    )

    # 2. the RayService
    manifest = rayservice_manifest(
        settings.rayservice_name,
        settings.rayservice_namespace,
        result.serve_config_v2,
        settings.ray_cluster_config,
    )
    where = f"{settings.rayservice_namespace}/{settings.rayservice_name}"
    existing = api.get_rayservice(settings.rayservice_namespace, settings.rayservice_name)
    if existing is None:
        if models:  # no Ray cluster for nothing; the chart may create it anyway
            api.create_rayservice(manifest)
            report.writes.append(f"create RayService {where}")
            logger.info("created RayService %s", where)
    else:
        current = yaml.safe_load((existing.get("spec") or {}).get("serveConfigV2") or "{}")
        if current != result.serve_config_v2:
            api.patch_rayservice_serve_config(
                settings.rayservice_namespace, settings.rayservice_name, manifest["spec"]["serveConfigV2"]
            )
            report.writes.append(f"patch RayService {where}")
            logger.info("updated serveConfigV2 of RayService %s", where)

    # 3-5. statuses, annotations, events, Model by Model
    events_by_model: dict[str, list[Event]] = {}
    for event in result.events:
        events_by_model.setdefault(event.model, []).append(event)
    for entry in entries:
        model = entry.model
        if model is None:
            status = _blocked_status(entry, now)
            was = entry.status.condition("Degraded") if entry.status else None
            said = was is not None and was.status == "True" and was.message == entry.problem
            events = (
                [] if said else [Event(type="Warning", reason="InvalidSpec", message=entry.problem or "")]
            )
            _write_model(api, entry, status, events, now, report)
            continue
        status = result.statuses[model.name]
        sc = scaling[model.name]
        conditions = [*status.conditions, _condition(model.status, "ScalingActive", *sc.condition, now)]
        if entry.problem is not None:
            # the spec is unreadable: what serves is the stable revision's, frozen
            conditions = [
                _condition(model.status, "Degraded", "True", "InvalidSpec", entry.problem, now)
                if c.type == "Degraded"
                else c
                for c in conditions
            ]
        status = status.model_copy(update={"conditions": conditions, "autoscaling": sc.autoscaling})
        events = [*events_by_model.get(model.name, []), *sc.events]
        if entry.problem is not None:
            was = model.status.condition("Degraded") if model.status else None
            if was is None or was.message != entry.problem:
                events.append(Event(type="Warning", reason="InvalidSpec", message=entry.problem))
        if not _write_model(api, entry, status, events, now, report):
            continue
        _clear_rollout_command(api, entry, model, status, now, report)

    # 6. deleted Models: the RayService above no longer serves them
    for obj in deleting:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            continue
        ns, name = meta.get("namespace", "default"), meta["name"]
        try:
            api.set_model_finalizers(
                ns, name, [f for f in finalizers if f != FINALIZER], meta["resourceVersion"]
            )
        except KubeError as e:
            report.errors.append(str(e))
            continue
        report.writes.append(f"release {ns}/{name}")
        _post(api, ObjectEvent(
            namespace=ns, name=name, uid=meta.get("uid"), reason="Removed",
            message=f"deployments of {name} removed from RayService {where}", at=now,
        ), report)  # fmt: skip
    return report


def _write_model(
    api: KubernetesApi,
    entry: _Entry,
    status: ModelResourceStatus,
    events: list[Event],
    now: float,
    report: LoopReport,
) -> bool:
    """Write the status when it changed, then post its events. False when the write failed."""
    if entry.status != status:
        try:
            api.patch_model_status(
                entry.namespace, entry.name, status.model_dump(mode="json", by_alias=True, exclude_none=True)
            )
        except KubeError as e:  # the events wait with it: the next round decides again
            report.errors.append(str(e))
            return False
        report.writes.append(f"status {entry.namespace}/{entry.name}")
    uid = entry.obj["metadata"].get("uid")
    for event in events:
        _post(api, ObjectEvent(
            namespace=entry.namespace, name=entry.name, uid=uid, type=event.type,
            reason=event.reason, message=event.message, at=now,
        ), report)  # fmt: skip
    return True


def _clear_rollout_command(
    api: KubernetesApi,
    entry: _Entry,
    model: ModelResource,
    status: ModelResourceStatus,
    now: float,
    report: LoopReport,
) -> None:
    """Remove the promote/abort annotation once it has nothing (more) to act on.

    Left in place, a stale `promote` would promote the *next* canary the moment it starts.
    """
    command = model.annotations.get(ROLLOUT_ANNOTATION)
    if command is None:
        return
    progressing = status.rollout is not None and status.rollout.phase == "Progressing"
    known = command.strip().lower() in ROLLOUT_COMMANDS
    if known and progressing:
        return  # acted on next round... or the rollout is waiting on something else; keep it
    was = model.status.rollout if model.status else None
    if not known:
        why = f"unknown rollout command {command!r}: use one of {', '.join(ROLLOUT_COMMANDS)}"
    elif was is None or was.phase != "Progressing":
        why = f"{ROLLOUT_ANNOTATION}={command} ignored: no canary is in progress"
    else:
        why = None  # consumed: the Promoted/Aborted event already says so
    try:
        api.set_model_annotation(entry.namespace, entry.name, ROLLOUT_ANNOTATION, None)
    except KubeError as e:
        report.errors.append(str(e))
        return
    report.writes.append(f"annotation {entry.namespace}/{entry.name}")
    if why is not None:
        _post(api, ObjectEvent(
            namespace=entry.namespace, name=entry.name, uid=entry.obj["metadata"].get("uid"),
            type="Warning", reason="RolloutCommandIgnored", message=why, at=now,
        ), report)  # fmt: skip


def _post(api: KubernetesApi, event: ObjectEvent, report: LoopReport) -> None:
    try:
        api.post_event(event)
    except KubeError as e:  # an Event is a record, not a decision: never stop the round for one
        report.errors.append(str(e))
        return
    report.events.append(event)
    report.writes.append(f"event {event.namespace}/{event.name} {event.reason}")
