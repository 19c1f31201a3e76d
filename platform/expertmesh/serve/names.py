"""Names of the platform's Serve applications and deployments (the operator and metrics use them too)."""

ROUTER_APP = "expertmesh"  # the ingress application: HTTP on "/", the gRPC proxy's one target


def revision_app_name(model: str, revision: str) -> str:
    return f"{model}-{revision}"


def engine_deployment_name(model: str, revision: str) -> str:
    return f"engine-{model}-{revision}"


def expert_deployment_name(model: str, revision: str, group: int) -> str:
    return f"experts-{model}-{revision}-g{group}"
