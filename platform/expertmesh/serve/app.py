"""Build the one Serve application of a platform instance from a ServeConfig."""

from __future__ import annotations

from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema

from expertmesh.config import ServeConfig, traffic_table
from expertmesh.serve.deployments import Engine, ExpertGroup, Router, partition_for

APP_NAME = "expertmesh"

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


def build_app(config: ServeConfig) -> serve.Application:
    engines: dict[str, dict[str, serve.Application]] = {}
    for model in config.models:
        engines[model.name] = {}
        for rev in model.revisions:
            spec = rev.model_dump()
            base = f"{model.name}-{rev.name}"
            groups = None
            if rev.expert_parallel.enabled:
                groups = [
                    ExpertGroup.options(
                        name=f"experts-{base}-g{g}", num_replicas=rev.expert_parallel.replicas_per_group
                    ).bind(spec, g, model=model.name)
                    for g in range(partition_for(rev).num_groups)
                ]
            engine = Engine.options(name=f"engine-{base}", num_replicas=rev.engine_replicas)
            engines[model.name][rev.name] = engine.bind(spec, groups, model=model.name)
    # the first revision of each model describes it to the API (context length, chat template)
    described = {model.name: model.revisions[0].model_dump() for model in config.models}
    router = Router.options(user_config={"traffic": traffic_table(config)})
    return router.bind(engines, described, config.api_key)


def app_builder(args: dict) -> serve.Application:
    """Serve's application builder (import path `expertmesh.serve.app:app_builder`)."""
    return build_app(ServeConfig.parse(args["config"], "application args 'config'"))


def serve_deploy_config(config: ServeConfig) -> dict:
    """The declarative Serve config (what a RayService's serveConfigV2 holds).

    The traffic table is left out of the builder's args and set as the Router's
    user_config override, so a rollout step changes only that: Serve reconfigures
    the Router in place and no replica restarts.
    """
    args = config.model_dump(mode="json")
    for model in args["models"]:
        model["traffic"] = None
    return {
        # Read when this config starts Serve (a RayService's serveConfigV2, `serve deploy`).
        "grpc_options": grpc_options(config.grpc_port).model_dump(exclude_unset=True),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "expertmesh.serve.app:app_builder",
                "args": {"config": args},
                "deployments": [{"name": "Router", "user_config": {"traffic": traffic_table(config)}}],
            }
        ],
    }


def deploy(config: ServeConfig, blocking: bool = True) -> None:
    """Apply the declarative config to the running Serve instance, as `serve deploy` would."""
    from ray.serve.context import _get_global_client

    schema = ServeDeploySchema.model_validate(serve_deploy_config(config))
    _get_global_client().deploy_apps(schema, _blocking=blocking)
