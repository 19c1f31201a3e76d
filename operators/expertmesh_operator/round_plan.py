"""What one round of the operator decides, as pure functions of what the round read.

`decide(objects, observed, metrics, now)` turns the listed Models (raw dicts, our finalizer
already in place: see admission.py), the observations and the pools' load into a `Plan`: the
RayService write, each Model's status (only when it changed) with the events to post after it,
the rollout annotations to remove, and the deleted Models to release. reconcile_round.py reads
the world and applies the plan; nothing here talks to Kubernetes or Prometheus.

Autoscaling needs the load of the pools the rollout is about to deploy (a canary's pools exist
once the rollout has decided to start it), so deciding takes two pure steps with a read between
them: `pools_to_measure` names the pools, the shell asks Prometheus, and `decide` runs the same
rollout pass again before it scales. Running the pass again, rather than handing its result
from one step to the next, keeps decide a function of observations alone: a test hands it
made-up load, and the shell holds nothing between the steps that could drift from what decide
sees. Same inputs, same pass: the pools measured are the pools scaled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.model.config import ModelConfig
from expertmesh.serve_layout import ENGINE_POOL, engine_deployment_name, expert_deployment_name, expert_pool
from expertmesh_operator.admission import Entry, FinalizerChange, admit, finalizers_of
from expertmesh_operator.conditions import INVALID_SPEC, condition, invalid_spec_events
from expertmesh_operator.crd import FINALIZER, ROLLOUT_ANNOTATION, ModelResource, ModelResourceStatus
from expertmesh_operator.events import Event
from expertmesh_operator.kube import ObjectEvent
from expertmesh_operator.model_scaling import ModelScaling, scale_model
from expertmesh_operator.operator_settings import OperatorSettings
from expertmesh_operator.pool_autoscale import PoolMetrics
from expertmesh_operator.reconcile import ObservedState, ReconcileResult, rayservice_manifest, reconcile
from expertmesh_operator.rollout import AnalysisResult

ROLLOUT_COMMANDS = ("promote", "abort")

# Model name -> Serve deployment -> its load (None: Prometheus had nothing for it)
PoolLoad = Mapping[str, Mapping[str, PoolMetrics | None]]


class Observations(BaseModel):
    """What the shell read besides the Models, before deciding."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    settings: OperatorSettings
    model_configs: dict[str, ModelConfig] = Field(default_factory=dict, description="checkpoint path ->")
    analyses: dict[str, AnalysisResult] = Field(default_factory=dict, description="Model name -> canary")
    serve_config: dict[str, Any] | None = Field(
        None, description="the RayService's serveConfigV2 as it stands; None: there is no RayService"
    )


class PoolQuery(BaseModel):
    """One question to Prometheus: the load of one revision's pools."""

    model_config = ConfigDict(frozen=True)

    model: str  # the Model's metadata.name: where the answer goes in PoolLoad
    served_name: str
    revision: str
    pools: dict[str, str]  # Prometheus pool label ("engine", "experts-gN") -> Serve deployment


class RayServiceWrite(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["create", "patch"]  # patch: serveConfigV2 only, the cluster is its creator's
    manifest: dict[str, Any]


class RolloutCommandClear(BaseModel):
    """The rollout annotation removed; `warning` posted after, when the command was not acted on."""

    model_config = ConfigDict(frozen=True)

    annotation: str = ROLLOUT_ANNOTATION
    warning: ObjectEvent | None = None  # None: consumed, the Promoted/Aborted event says so


class ModelUpdate(BaseModel):
    """The writes to one Model, in order; the events and the clear wait for the status write."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    status: ModelResourceStatus | None = Field(None, description="the whole new status; None: unchanged")
    events: list[ObjectEvent] = Field(default_factory=list)
    clear_rollout_command: RolloutCommandClear | None = None


class Release(BaseModel):
    """A deleted Model the RayService no longer serves: our finalizer off, then say so."""

    model_config = ConfigDict(frozen=True)

    finalizers: FinalizerChange
    event: ObjectEvent


class Plan(BaseModel):
    """Every write of one round, in the order they are made. An empty plan: nothing changed."""

    model_config = ConfigDict(frozen=True)

    rayservice: RayServiceWrite | None = None
    models: list[ModelUpdate] = Field(default_factory=list)
    releases: list[Release] = Field(default_factory=list)


def pools_to_measure(
    objects: Sequence[dict[str, Any]], observed: Observations, now: float
) -> list[PoolQuery]:
    """The pools whose load the autoscaler needs: each deployed revision's, after this round's rollout."""
    models = admit(objects).models
    first = _rollout_pass(models, observed, now, replicas={})
    queries = []
    for model in models:
        pools = first.statuses[model.name].replicas_per_pool
        for revision in _revisions(model, first.statuses[model.name], pools):
            labels = {ENGINE_POOL: engine_deployment_name(model.served_name, revision)}
            g = 0
            while (deployment := expert_deployment_name(model.served_name, revision, g)) in pools:
                labels[expert_pool(g)] = deployment
                g += 1
            queries.append(
                PoolQuery(model=model.name, served_name=model.served_name, revision=revision, pools=labels)
            )
    return queries


def decide(
    objects: Sequence[dict[str, Any]], observed: Observations, metrics: PoolLoad | None, now: float
) -> Plan:
    """The round's writes. `metrics`: the answers to `pools_to_measure`; None: no Prometheus."""
    admission = admit(objects)
    models = admission.models
    # rollout first, then autoscaling on the pools the rollout left, then the rollout again with
    # the replicas chosen (they live in the serve config the rollout pass builds)
    first = _rollout_pass(models, observed, now, replicas={})
    scaling = {m.name: _scale(m, first.statuses[m.name], observed, metrics, now) for m in models}
    chosen = {name: s.replicas for name, s in scaling.items() if s.replicas}
    result = _rollout_pass(models, observed, now, replicas=chosen) if chosen else first

    updates = []
    for entry in admission.entries:
        if entry.model is None:
            update = _blocked_update(entry, now)
        else:
            update = _deployed_update(entry, entry.model, result, scaling[entry.model.name], now)
        if update is not None:
            updates.append(update)
    return Plan(
        rayservice=_rayservice_write(result.serve_config_v2, bool(models), observed),
        models=updates,
        releases=[
            _release(o, observed.settings, now) for o in admission.deleting if FINALIZER in finalizers_of(o)
        ],
    )


def _rollout_pass(
    models: Sequence[ModelResource], observed: Observations, now: float, replicas: dict[str, dict[str, int]]
) -> ReconcileResult:
    state = ObservedState(
        model_configs=observed.model_configs,
        analyses=observed.analyses,
        replicas=replicas,
        endpoint=observed.settings.serve_endpoint,
    )
    rollouts = {m.name: (m.status.rollout if m.status else None) for m in models}
    return reconcile(models, state, rollouts, now)


def _revisions(model: ModelResource, status: ModelResourceStatus, pools: Mapping[str, int]) -> list[str]:
    """The revisions this round deploys, stable first, that have an engine pool."""
    state = status.rollout
    if state is None:
        return []
    names = [r.name for r in (state.stable, state.canary) if r is not None]
    return [n for n in names if engine_deployment_name(model.served_name, n) in pools]


def _scale(
    model: ModelResource,
    first: ModelResourceStatus,
    observed: Observations,
    metrics: PoolLoad | None,
    now: float,
) -> ModelScaling:
    pools = first.replicas_per_pool
    load = None if metrics is None else metrics.get(model.name, {})
    cfg = observed.model_configs.get(model.spec.source.path())
    moge = cfg is not None and cfg.moe is not None and cfg.moe.routing == "moge"
    return scale_model(model, _revisions(model, first, pools), pools, load, moge, now)


def _rayservice_write(
    serve_config: dict[str, Any], any_models: bool, observed: Observations
) -> RayServiceWrite | None:
    settings = observed.settings
    manifest = rayservice_manifest(
        settings.rayservice_name, settings.rayservice_namespace, serve_config, settings.ray_cluster_config
    )
    if observed.serve_config is None:
        # no Ray cluster for nothing; the chart may create it anyway
        return RayServiceWrite(action="create", manifest=manifest) if any_models else None
    if observed.serve_config != serve_config:
        return RayServiceWrite(action="patch", manifest=manifest)
    return None


def _blocked_status(entry: Entry, now: float) -> ModelResourceStatus:
    """Status of a Model that cannot take part: Degraded, with the reason, nothing deployed."""
    prev = entry.status
    return ModelResourceStatus(
        conditions=[
            condition(prev, "Ready", "False", "NotDeployed", "see the Degraded condition", now),
            condition(prev, "Progressing", "False", "Settled", "", now),
            condition(prev, "Degraded", "True", INVALID_SPEC, entry.problem or "", now),
        ],
        observed_generation=entry.obj["metadata"].get("generation", 1),
        ready="False",
    )


def _blocked_update(entry: Entry, now: float) -> ModelUpdate | None:
    events = invalid_spec_events(entry.status, entry.problem or "")
    return _model_update(entry, _blocked_status(entry, now), events, None, now)


def _deployed_update(
    entry: Entry, model: ModelResource, result: ReconcileResult, scaling: ModelScaling, now: float
) -> ModelUpdate | None:
    status = result.statuses[model.name]
    conditions = [*status.conditions, condition(model.status, "ScalingActive", *scaling.condition, now)]
    events = [*(e for e in result.events if e.model == model.name), *scaling.events]
    if entry.problem is not None:
        # the spec is unreadable: what serves is the stable revision's, frozen
        degraded = condition(model.status, "Degraded", "True", INVALID_SPEC, entry.problem, now)
        conditions = [degraded if c.type == "Degraded" else c for c in conditions]
        events += invalid_spec_events(model.status, entry.problem)
    status = status.model_copy(update={"conditions": conditions, "autoscaling": scaling.autoscaling})
    clear = _rollout_command_clear(entry, model, status, now)
    return _model_update(entry, status, events, clear, now)


def _model_update(
    entry: Entry,
    status: ModelResourceStatus,
    events: list[Event],
    clear: RolloutCommandClear | None,
    now: float,
) -> ModelUpdate | None:
    """None when there is nothing to write: same status, nothing to say, no annotation to drop."""
    changed = status if entry.status != status else None
    if changed is None and not events and clear is None:
        return None
    return ModelUpdate(
        namespace=entry.namespace,
        name=entry.name,
        status=changed,
        events=[_object_event(entry, now, e) for e in events],
        clear_rollout_command=clear,
    )


def _rollout_command_clear(
    entry: Entry, model: ModelResource, status: ModelResourceStatus, now: float
) -> RolloutCommandClear | None:
    """Remove the promote/abort annotation once it has nothing (more) to act on.

    Left in place, a stale `promote` would promote the *next* canary the moment it starts.
    """
    command = model.annotations.get(ROLLOUT_ANNOTATION)
    if command is None:
        return None
    progressing = status.rollout is not None and status.rollout.phase == "Progressing"
    known = command.strip().lower() in ROLLOUT_COMMANDS
    if known and progressing:
        return None  # acted on next round... or the rollout is waiting on something else; keep it
    was = model.status.rollout if model.status else None
    if not known:
        why = f"unknown rollout command {command!r}: use one of {', '.join(ROLLOUT_COMMANDS)}"
    elif was is None or was.phase != "Progressing":
        why = f"{ROLLOUT_ANNOTATION}={command} ignored: no canary is in progress"
    else:
        return RolloutCommandClear()  # consumed: the Promoted/Aborted event already says so
    warning = Event(type="Warning", reason="RolloutCommandIgnored", message=why)
    return RolloutCommandClear(warning=_object_event(entry, now, warning))


def _object_event(entry: Entry, now: float, event: Event) -> ObjectEvent:
    return ObjectEvent(
        namespace=entry.namespace,
        name=entry.name,
        uid=entry.uid,
        type=event.type,
        reason=event.reason,
        message=event.message,
        at=now,
    )


def _release(obj: dict[str, Any], settings: OperatorSettings, now: float) -> Release:
    meta = obj["metadata"]
    ns, name = meta.get("namespace", "default"), meta["name"]
    return Release(
        finalizers=FinalizerChange(
            namespace=ns,
            name=name,
            finalizers=[f for f in finalizers_of(obj) if f != FINALIZER],
            resource_version=meta["resourceVersion"],
        ),
        event=ObjectEvent(
            namespace=ns,
            name=name,
            uid=meta.get("uid"),
            reason="Removed",
            message=f"deployments of {name} removed from RayService {settings.rayservice_path}",
            at=now,
        ),
    )
