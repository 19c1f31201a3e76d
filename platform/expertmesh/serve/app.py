"""The Serve applications of a platform instance, from one ServeConfig.

The Router's application is the ingress (HTTP on "/", and the gRPC proxy's only target);
each model revision is an application of its own with its engine and expert pools.
"""

from __future__ import annotations

import time

from pydantic import ValidationError
from ray import serve
from ray.serve.config import RequestRouterConfig, gRPCOptions
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from expertmesh.config import ConfigError, RevisionSpec, ServeConfig
from expertmesh.errors import ExpertMeshError
from expertmesh.serve.deployments import Engine, ExpertGroup, Router, partition_for
from expertmesh.serve.prefix_routing import PrefixAffinityRouter
from expertmesh.serve_layout import (
    APP_NAME,
    engine_deployment_name,
    expert_deployment_name,
    grpc_options_fields,
    revision_app_name,
    router_user_config,
    serve_deploy_config,
)


def grpc_options(port: int = 9000, request_timeout_s: float | None = None) -> gRPCOptions:
    """Options for Serve's gRPC proxy: ``serve.start(grpc_options=grpc_options(port))``. Proxy
    options are fixed when Serve starts; a running Serve keeps the ones it started with."""
    return gRPCOptions(**grpc_options_fields(port, request_timeout_s))


def engine_request_router(rev: RevisionSpec) -> RequestRouterConfig:
    """How the Router's handle picks an engine replica of this revision."""
    if rev.engine_routing == "prefix_aware":
        return RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    return RequestRouterConfig()  # Serve's default: power of two choices, by queue length


def build_revision_app(model: str, rev: RevisionSpec) -> serve.Application:
    """One model revision: its Engine (the app's ingress, no route) and its expert pools."""
    spec = rev.model_dump()
    groups = None
    if rev.expert_parallel.enabled:
        groups = [
            ExpertGroup.options(
                name=expert_deployment_name(model, rev.name, g),
                num_replicas=rev.expert_parallel.replicas_per_group,
                ray_actor_options=rev.resources.experts.ray_actor_options(),
            ).bind(spec, g, model=model)
            for g in range(partition_for(rev).num_groups)
        ]
    engine = Engine.options(
        name=engine_deployment_name(model, rev.name),
        num_replicas=rev.engine_replicas,
        ray_actor_options=rev.resources.engine.ray_actor_options(),
        request_router_config=engine_request_router(rev),
    )
    return engine.bind(spec, groups, model=model)


def revision_builder(args: dict) -> serve.Application:
    """Serve's builder for a revision's application (`expertmesh.serve.app:revision_builder`)."""
    try:
        revision = RevisionSpec.model_validate(args["revision"])
    except (KeyError, ValidationError) as exc:
        raise ConfigError(f"application args 'revision': {exc}") from exc
    return build_revision_app(args["model"], revision)


def router_builder(args: dict) -> serve.Application:
    """Serve's builder for the Router's application (`expertmesh.serve.app:router_builder`)."""
    return Router.bind()


def build_apps(config: ServeConfig) -> dict[str, serve.Application]:
    """The applications `serve_deploy_config` describes, built in this process (what Serve builds)."""
    apps = {APP_NAME: Router.options(user_config=router_user_config(config)).bind()}
    for model in config.models:
        for rev in model.revisions:
            apps[revision_app_name(model.name, rev.name)] = build_revision_app(model.name, rev)
    return apps


# How long `deploy` waits for the applications to run. Serve's own blocking deploy gives up
# after 60 s, which 16 expert-pool replicas starting on 2 shared cores can take.
DEPLOY_TIMEOUT_S = 600.0


def deploy(config: ServeConfig, blocking: bool = True, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Apply the declarative config to the running Serve instance, as `serve deploy` would;
    `blocking`: return once every application runs (or raise if one fails, or at the timeout)."""
    from ray.serve.context import _get_global_client

    schema = ServeDeploySchema.model_validate(serve_deploy_config(config))
    client = _get_global_client()
    client.deploy_apps(schema, _blocking=False)
    if not blocking:
        return
    names = {app.name for app in schema.applications}
    start = time.monotonic()
    while (state := deploy_state(names, serve.status().applications)) != "running":
        if state.startswith("failed") or time.monotonic() - start > timeout_s:
            raise ExpertMeshError(
                f"Serve applications not running after {time.monotonic() - start:.0f} s: {state}"
            )
        time.sleep(0.2)
    client.wait_for_proxies_serving(wait_for_applications_running=True)


def deploy_state(names: set[str], applications: dict) -> str:
    """'running' when every named application runs; 'failed: ...' when one failed to deploy;
    else 'waiting: ...' with each one's status (pure: `applications` as serve.status() has them)."""
    statuses = {name: applications[name] for name in sorted(names) if name in applications}
    failed = [f"{n}: {a.message}" for n, a in statuses.items() if a.status == ApplicationStatus.DEPLOY_FAILED]
    if failed:
        return "failed: " + "; ".join(failed)
    if len(statuses) == len(names) and all(a.status == ApplicationStatus.RUNNING for a in statuses.values()):
        return "running"
    return "waiting: " + ", ".join(
        f"{n} {statuses[n].status.value if n in statuses else 'not yet listed'}" for n in sorted(names)
    )
