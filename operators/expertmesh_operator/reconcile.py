"""The operator's whole decision, as a pure function.

`reconcile(models, observed, rollout_states, now)` folds every `Model` into one Serve
config (what the RayService's serveConfigV2 holds), one status per Model and the events
to post. A Model whose spec is invalid keeps its previously deployed revisions (from its
stored rollout state) and is marked Degraded; a new one is simply not deployed. The same
inputs give identical outputs, so the I/O layer can compare and write nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expertmesh.config import (
    ExpertParallelSpec,
    ModelSpec,
    RevisionResources,
    RevisionSpec,
    ServeConfig,
    default_groups,
)
from expertmesh.engine.config import EngineConfig
from expertmesh.model.config import ModelConfig
from expertmesh.serve_layout import (
    engine_deployment_name,
    expert_deployment_name,
    revision_app_name,
    serve_deploy_config,
)
from expertmesh_operator.conditions import INVALID_SPEC, condition, invalid_spec_events
from expertmesh_operator.crd import (
    ModelResource,
    ModelResourceSpec,
    ModelResourceStatus,
    RevisionRecord,
    RevisionTraffic,
    RolloutState,
)
from expertmesh_operator.events import Event
from expertmesh_operator.resources import replica_resources
from expertmesh_operator.rollout import AnalysisResult, advance, weights
from expertmesh_operator.spec_checks import spec_problems


class ObservedState(BaseModel):
    """What the I/O layer read from the world this round."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model_configs: dict[str, ModelConfig] = Field(default_factory=dict, description="checkpoint path ->")
    analyses: dict[str, AnalysisResult] = Field(default_factory=dict, description="Model name -> canary")
    replicas: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Model name -> Serve deployment -> replicas the autoscaler chose"
    )
    endpoint: str | None = None


class ReconcileResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    serve_config_v2: dict[str, Any]
    statuses: dict[str, ModelResourceStatus]
    events: list[Event]


def _revision_spec(record: RevisionRecord) -> RevisionSpec:
    spec = record.spec
    ep = spec.expert_parallel
    engine_resources, engine_threads = replica_resources(spec.resources.engine)
    expert_resources, expert_threads = replica_resources(spec.resources.experts)
    return RevisionSpec(
        name=record.name,
        source=spec.source.path(),
        dtype=spec.architecture.dtype,
        engine_replicas=spec.engine_replicas,
        engine_routing=spec.engine_routing,
        engine_threads=engine_threads,
        expert_threads=expert_threads,
        resources=RevisionResources(engine=engine_resources, experts=expert_resources),
        expert_parallel=ExpertParallelSpec(
            enabled=ep.enabled, groups=ep.groups, replicas_per_group=ep.replicas_per_group
        ),
        engine=EngineConfig(
            max_num_seqs=spec.limits.max_num_seqs,
            max_num_batched_tokens=spec.limits.max_batch_tokens,
            max_model_len=spec.limits.max_context,
            enable_prefix_caching=spec.prefix_caching,
            speculative=spec.speculative.model_dump() if spec.speculative else None,
        ),
    )


def _groups(spec: ModelResourceSpec, cfg: ModelConfig | None) -> int | None:
    ep = spec.expert_parallel
    if not ep.enabled:
        return 0
    if ep.groups is not None:
        return ep.groups
    if cfg is not None and cfg.moe is not None:
        return default_groups(cfg.moe.num_experts, cfg.moe.routing_groups)
    return None  # unknown until the checkpoint is readable


def _placed_pools(
    served: str, records: Sequence[RevisionRecord], observed: ObservedState, chosen: Mapping[str, int]
) -> dict[str, tuple[str, int]]:
    """Serve deployment -> (its Serve application, replicas); each revision is an application."""
    pools: dict[str, tuple[str, int]] = {}
    for record in records:
        spec, app = record.spec, revision_app_name(served, record.name)
        engine = engine_deployment_name(served, record.name)
        pools[engine] = (app, chosen.get(engine, spec.engine_replicas))
        groups = _groups(spec, observed.model_configs.get(spec.source.path()))
        for g in range(groups or 0):
            pool = expert_deployment_name(served, record.name, g)
            pools[pool] = (app, chosen.get(pool, spec.expert_parallel.replicas_per_group))
    return pools


def _status(
    model: ModelResource,
    state: RolloutState | None,
    traffic: dict[str, int],
    pools: dict[str, int],
    problems: list[str],
    observed: ObservedState,
    now: float,
) -> ModelResourceStatus:
    prev = model.status
    serving = bool(traffic)
    if problems:
        degraded = ("True", INVALID_SPEC, "; ".join(problems))
    elif state is not None and state.phase in ("RolledBack", "Aborted"):
        reason = "CanaryAnalysisFailed" if state.phase == "RolledBack" else "RolloutAborted"
        degraded = ("True", reason, state.message)
    else:
        degraded = ("False", "AsExpected", "")
    progressing = state is not None and state.phase == "Progressing"
    if serving:
        ready = ("True", "Serving", f"revisions {', '.join(f'{k}={v}%' for k, v in traffic.items())}")
    else:
        ready = ("False", "NotDeployed", "nothing deployed: fix the spec problems in the Degraded condition")
    conditions = [
        condition(prev, "Ready", *ready, now),
        condition(
            prev,
            "Progressing",
            "True" if progressing else "False",
            "CanaryInProgress" if progressing else "Settled",
            state.message if progressing and state else "",
            now,
        ),  # fmt: skip
        condition(prev, "Degraded", *degraded, now),
    ]
    stable = state.stable.name if state is not None and state.stable is not None else None
    return ModelResourceStatus(
        conditions=conditions,
        observed_generation=model.generation,
        revisions=[RevisionTraffic(name=k, traffic=v) for k, v in traffic.items()],
        replicas_per_pool=pools,
        endpoint=observed.endpoint if serving else None,
        ready=ready[0],
        revision=stable,
        traffic=",".join(f"{k}={v}" for k, v in traffic.items()) or None,
        replicas=sum(pools.values()),
        rollout=state,
    )


def _records(state: RolloutState | None) -> list[RevisionRecord]:
    if state is None or state.stable is None:
        return []
    return [state.stable, state.canary] if state.phase == "Progressing" and state.canary else [state.stable]


def reconcile(
    models: Sequence[ModelResource],
    observed: ObservedState,
    rollout_states: Mapping[str, RolloutState | None],
    now: float,
) -> ReconcileResult:
    model_specs: list[ModelSpec] = []
    statuses: dict[str, ModelResourceStatus] = {}
    events: list[Event] = []
    overrides: dict[str, dict[str, int]] = {}  # Serve application -> deployment -> replicas
    served_by: dict[str, str] = {}
    for model in sorted(models, key=lambda m: m.name):
        previous = rollout_states.get(model.name)
        cfg = observed.model_configs.get(model.spec.source.path())
        problems = spec_problems(model.spec, cfg)
        if model.served_name in served_by:
            problems.append(
                f"servedName {model.served_name!r} is already served by Model {served_by[model.served_name]!r}"
            )
        model_events: list[Event] = []
        if problems:
            # freeze: the previously deployed revisions keep serving at their current weights
            state = previous
            records = _records(state)
            traffic = weights(state, records[-1].spec) if state is not None and records else {}
        else:
            state, traffic, model_events = advance(
                previous, model.spec, observed.analyses.get(model.name), model.annotations, now
            )
            records = _records(state)
        chosen = observed.replicas.get(model.name, {})
        placed = _placed_pools(model.served_name, records, observed, chosen)
        pools = {name: n for name, (_, n) in placed.items()}
        if records:
            try:
                model_specs.append(
                    ModelSpec(
                        name=model.served_name,
                        revisions=[_revision_spec(r) for r in records],
                        traffic={r.name: traffic.get(r.name, 0) for r in records},
                    )
                )
            except ValidationError as exc:
                problems.append(f"cannot build the serve config: {exc.errors()[0]['msg']}")
                traffic, pools = {}, {}
            else:
                served_by[model.served_name] = model.name
                for name, (app, n) in placed.items():
                    if name in chosen:
                        overrides.setdefault(app, {})[name] = n
        if problems:  # after every check has had its say: the Degraded message holds them all
            model_events = [*model_events, *invalid_spec_events(model.status, "; ".join(problems))]
        statuses[model.name] = _status(model, state, traffic, pools, problems, observed, now)
        events.extend(e.model_copy(update={"model": model.name}) for e in model_events)

    return ReconcileResult(
        serve_config_v2=_serve_config(model_specs, overrides), statuses=statuses, events=events
    )


def _serve_config(model_specs: list[ModelSpec], overrides: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """serveConfigV2; `overrides`: Serve application -> deployment -> replicas the autoscaler chose."""
    # No servable Model still deploys the Router (answering model-not-found), exactly what
    # the chart installs, so the first Model adds applications and never changes grpc_options.
    config = serve_deploy_config(ServeConfig(models=model_specs))
    # autoscaler decisions as per-deployment overrides: Serve changes replica counts in place
    for app in config["applications"]:
        chosen_here = overrides.get(app["name"], {})
        listed = {d["name"]: d for d in app["deployments"]}
        for name, n in sorted(chosen_here.items()):
            listed.setdefault(name, {"name": name})["num_replicas"] = n
        app["deployments"] = list(listed.values())
    return config


def rayservice_manifest(
    name: str, namespace: str, serve_config_v2: dict[str, Any], ray_cluster_config: dict[str, Any]
) -> dict[str, Any]:
    """The KubeRay RayService object; serveConfigV2 is a YAML string, as KubeRay expects."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "expertmesh-operator",
                "app.kubernetes.io/name": "expertmesh",
            },
        },
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config_v2, sort_keys=True),
            "rayClusterConfig": ray_cluster_config,
        },
    }
