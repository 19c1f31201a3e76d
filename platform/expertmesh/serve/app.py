"""The Serve applications of a platform instance, from one ServeConfig.

The Router's application is the ingress (HTTP on "/", and the gRPC proxy's only target);
each model revision is an application of its own with its engine and expert pools.
"""

from __future__ import annotations

import copy
import time

from pydantic import ValidationError
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from expertmesh.config import ConfigError, RevisionSpec, ServeConfig, traffic_table
from expertmesh.errors import ExpertMeshError
from expertmesh.serve.deployments import Engine, ExpertGroup, Router, partition_for
from expertmesh.serve.names import (
    ROUTER_APP,
    engine_deployment_name,
    expert_deployment_name,
    revision_app_name,
)

APP_NAME = ROUTER_APP

# The services Serve's gRPC proxy hosts. For each call the proxy invokes the ingress (Router) method
# named after the RPC; see expertmesh.api.grpc_service.
GRPC_SERVICER_FUNCTIONS = (
    "expertmesh.api.pb.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "expertmesh.api.pb.generation_pb2_grpc.add_GenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)


def grpc_options(port: int = 9000, request_timeout_s: float | None = None) -> gRPCOptions:
    """Options for Serve's gRPC proxy: ``serve.start(grpc_options=grpc_options(port))``.

    The proxy listens on all interfaces at ``port``, hosts the OIP v2, Generation and health
    services, and answers gRPC server reflection for them. Proxy options are fixed when Serve
    starts; a running Serve keeps the ones it started with.
    """
    return gRPCOptions(
        port=port,
        grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
        request_timeout_s=request_timeout_s,
        enable_reflection=True,
    )


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
    )
    return engine.bind(spec, groups, model=model)


def revision_builder(args: dict) -> serve.Application:
    """Serve's builder for a revision's application (`expertmesh.serve.app:revision_builder`)."""
    try:
        revision = RevisionSpec.model_validate(args["revision"])
    except (KeyError, ValidationError) as exc:
        raise ConfigError(f"application args 'revision': {exc}") from exc
    return build_revision_app(args["model"], revision)


def router_user_config(config: ServeConfig) -> dict:
    """Everything the Router knows, as its user_config: changing it reconfigures, never restarts."""
    platform = config.model_dump(mode="json")
    for model in platform["models"]:
        model["traffic"] = None  # carried once, below, where the rollout changes it
    return {"config": platform, "traffic": traffic_table(config)}


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


def serve_deploy_config(config: ServeConfig) -> dict:
    """The declarative Serve config (what a RayService's serveConfigV2 holds).

    Serve restarts every deployment of an application whose args change, so each model
    revision is an application of its own and the Router's state is its user_config:
    a new Model, a new revision or a changed spec restarts only that revision's engine and
    pools, and a traffic step only reconfigures the Router. Only the Router's application has
    a route, so the HTTP and gRPC proxies see exactly one ingress.
    """
    router = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "expertmesh.serve.app:router_builder",
        "args": {},
        "deployments": [{"name": "Router", "user_config": router_user_config(config)}],
    }
    revisions = []
    for model in config.models:
        for rev in model.revisions:
            revisions.append(
                {
                    "name": revision_app_name(model.name, rev.name),
                    "route_prefix": None,
                    "import_path": "expertmesh.serve.app:revision_builder",
                    "args": {"model": model.name, "revision": rev.model_dump(mode="json")},
                    # replica counts the operator's autoscaler chooses are added here by name
                    "deployments": [],
                }
            )
    return {
        # Read when this config starts Serve (a RayService's serveConfigV2, `serve deploy`).
        "grpc_options": grpc_options(config.grpc_port).model_dump(exclude_unset=True),
        "applications": [router, *revisions],
    }


def all_deployments(serve_config_v2: dict) -> dict[str, dict]:
    """Deployment name -> its entry, across every application of a deploy config."""
    return {d["name"]: d for app in serve_config_v2["applications"] for d in app.get("deployments", [])}


def platform_config(serve_config_v2: dict, what: str = "serveConfigV2") -> ServeConfig:
    """The ServeConfig a deploy config was made from (read back from the Router's user_config)."""
    try:
        (router,) = [app for app in serve_config_v2["applications"] if app["name"] == APP_NAME]
        (entry,) = [d for d in router["deployments"] if d["name"] == "Router"]
        raw = copy.deepcopy(entry["user_config"]["config"])
        traffic = entry["user_config"]["traffic"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: no Router application with a user_config 'config' ({exc!r})") from exc
    for model in raw.get("models", []):
        model["traffic"] = traffic.get(model.get("name"))
    return ServeConfig.parse(raw, what)


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
