"""What a platform's Ray Serve deployment looks like, as plain data: application and deployment
names, metric pools and names, the gRPC proxy's options and the declarative deploy config.

It imports neither torch nor Ray, so the operator (which writes this config into a RayService
and reads these metrics from Prometheus) runs without them; `expertmesh.serve` builds the
deployments it names.
"""

from __future__ import annotations

import copy

from expertmesh.config import ConfigError, ServeConfig, traffic_table

ROUTER_APP = "expertmesh"  # the ingress application: HTTP on "/", the gRPC proxy's one target
APP_NAME = ROUTER_APP


def revision_app_name(model: str, revision: str) -> str:
    return f"{model}-{revision}"


def engine_deployment_name(model: str, revision: str) -> str:
    return f"engine-{model}-{revision}"


def expert_deployment_name(model: str, revision: str, group: int) -> str:
    return f"experts-{model}-{revision}-g{group}"


# ---- metrics: the `pool` label and the names Prometheus stores (counters gain "_total",
# histograms "_bucket"/"_sum"/"_count"); the serve plane exports them, the operator queries them

ENGINE_POOL = "engine"


def expert_pool(group: int) -> str:
    return f"experts-g{group}"


REQUESTS_METRIC = "expertmesh_requests"
TTFT_METRIC = "expertmesh_time_to_first_token_seconds"
TPOT_METRIC = "expertmesh_time_per_output_token_seconds"
PROMPT_TOKENS_METRIC = "expertmesh_prompt_tokens"
GENERATION_TOKENS_METRIC = "expertmesh_generation_tokens"
BATCH_SIZE_METRIC = "expertmesh_batch_size"
QUEUE_DEPTH_METRIC = "expertmesh_queue_depth"
GROUP_TOKENS_METRIC = "expertmesh_expert_group_tokens"
REPLICA_UP_METRIC = "expertmesh_replica_up"
ERROR_OUTCOME = "error"
NOT_ADMITTED_OUTCOME = "rejected"  # invalid or queue full: the client's to fix

# ---- the gRPC proxy

# The services Serve's gRPC proxy hosts. For each call the proxy invokes the ingress (Router) method
# named after the RPC; see expertmesh.api.grpc_service.
GRPC_SERVICER_FUNCTIONS = (
    "expertmesh.api.pb.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "expertmesh.api.pb.generation_pb2_grpc.add_GenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)


def grpc_options_fields(port: int = 9000, request_timeout_s: float | None = None) -> dict:
    """Serve's gRPCOptions as fields: the proxy listens on all interfaces at `port`, hosts the OIP
    v2, Generation and health services, and answers gRPC server reflection for them."""
    return {
        "port": port,
        "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
        "request_timeout_s": request_timeout_s,
        "enable_reflection": True,
    }


# ---- the declarative config


def router_user_config(config: ServeConfig) -> dict:
    """Everything the Router knows, as its user_config: changing it reconfigures, never restarts."""
    platform = config.model_dump(mode="json")
    for model in platform["models"]:
        model["traffic"] = None  # carried once, below, where the rollout changes it
    return {"config": platform, "traffic": traffic_table(config)}


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
        "grpc_options": grpc_options_fields(config.grpc_port),
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
