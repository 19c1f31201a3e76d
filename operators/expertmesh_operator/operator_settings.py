"""How an operator process is set up: which namespaces it watches, which RayService it writes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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

    @property
    def rayservice_path(self) -> str:
        """namespace/name, as messages name the RayService."""
        return f"{self.rayservice_namespace}/{self.rayservice_name}"
