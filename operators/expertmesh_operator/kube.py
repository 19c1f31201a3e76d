"""The Kubernetes API calls the operator and the kubectl plugin make, and nothing else.

`KubernetesApi` is the protocol; `KubernetesClient` implements it with the official
`kubernetes` client (the [operator] extra). The tests have an in-memory fake of the same
protocol. Objects go in and out as plain dicts, as the API server writes them; parsing them
into pydantic models is the caller's business (crd.ModelResource). The Helm chart's RBAC
grants exactly these calls, plus kopf's watch: models (list, watch, get, patch),
models/status (patch), rayservices (get, create, patch), events (create).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from expertmesh_operator.crd import GROUP, KIND, PLURAL, VERSION, rfc3339

RAY_GROUP, RAY_VERSION, RAYSERVICE_PLURAL = "ray.io", "v1", "rayservices"
COMPONENT = "expertmesh-operator"


class KubeError(Exception):
    """An API call failed; the message names the call, the object and the server's reason."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ConflictError(KubeError):
    """The object changed since it was read (HTTP 409); read it again and retry."""


class ObjectEvent(BaseModel):
    """A Kubernetes Event about one Model."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str = Field(..., description="the Model's name")
    uid: str | None = None
    type: str = "Normal"
    reason: str
    message: str
    at: float


class KubernetesApi(Protocol):
    def list_models(self, namespaces: Sequence[str] | None) -> list[dict[str, Any]]:
        """Models in these namespaces; None: in all namespaces."""

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the Model's whole status (status subresource)."""

    def set_model_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        """Replace metadata.finalizers; ConflictError when the object moved past resource_version."""

    def set_model_annotation(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """Set one annotation, or remove it when value is None."""

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_rayservice(self, body: dict[str, Any]) -> None: ...

    def patch_rayservice_serve_config(self, namespace: str, name: str, serve_config_v2: str) -> None:
        """Set spec.serveConfigV2 only: rayClusterConfig belongs to whoever created the RayService."""

    def post_event(self, event: ObjectEvent) -> None: ...


def event_body(event: ObjectEvent) -> dict[str, Any]:
    """A core/v1 Event referencing the Model, as `kubectl describe model` lists them."""
    stamp = rfc3339(event.at)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{event.name}.{uuid.uuid4().hex[:16]}", "namespace": event.namespace},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": event.name,
            "namespace": event.namespace,
            **({"uid": event.uid} if event.uid else {}),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A `kubernetes.client.ApiClient`: from this kubeconfig, else $KUBECONFIG/~/.kube/config, else
    the in-cluster service account. No global state: two clients may talk to two clusters."""
    from kubernetes import client, config

    configuration = client.Configuration()
    in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
    if in_cluster and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        try:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        except (config.ConfigException, OSError) as e:
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise KubeError(
                f"cannot load the kubeconfig {where}: {e}; pass --kubeconfig, or run in a cluster"
            ) from None
    return client.ApiClient(configuration)


class KubernetesClient:
    """`KubernetesApi` over the official client."""

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, context: str | None = None) -> KubernetesClient:
        return cls(load_api_client(kubeconfig, context))

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            reason = _api_reason(e)
            cls = ConflictError if e.status == 409 else KubeError
            raise cls(f"{what}: HTTP {e.status} {reason}", status=e.status) from None

    def _model_args(self, namespace: str) -> tuple[str, str, str, str]:
        return GROUP, VERSION, namespace, PLURAL

    def list_models(self, namespaces: Sequence[str] | None) -> list[dict[str, Any]]:
        if namespaces is None:
            reply = self._call(
                "list Models in all namespaces",
                self._custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
            )
            return list(reply.get("items", []))
        items: list[dict[str, Any]] = []
        for ns in namespaces:
            reply = self._call(
                f"list Models in namespace {ns}",
                self._custom.list_namespaced_custom_object,
                *self._model_args(ns),
            )
            items.extend(reply.get("items", []))
        return items

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                f"get Model {namespace}/{name}",
                self._custom.get_namespaced_custom_object,
                *self._model_args(namespace),
                name,
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        # a JSON patch replaces the whole status; a merge patch would keep keys we dropped
        self._call(
            f"patch the status of Model {namespace}/{name}",
            self._custom.patch_namespaced_custom_object_status,
            *self._model_args(namespace),
            name,
            [{"op": "add", "path": "/status", "value": status}],
            _content_type="application/json-patch+json",
        )

    def set_model_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        self._call(
            f"set the finalizers of Model {namespace}/{name}",
            self._custom.patch_namespaced_custom_object,
            *self._model_args(namespace),
            name,
            {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}},
            _content_type="application/merge-patch+json",
        )

    def set_model_annotation(self, namespace: str, name: str, key: str, value: str | None) -> None:
        self._call(
            f"annotate Model {namespace}/{name} with {key}={value}",
            self._custom.patch_namespaced_custom_object,
            *self._model_args(namespace),
            name,
            {"metadata": {"annotations": {key: value}}},
            _content_type="application/merge-patch+json",
        )

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                f"get RayService {namespace}/{name}",
                self._custom.get_namespaced_custom_object,
                RAY_GROUP,
                RAY_VERSION,
                namespace,
                RAYSERVICE_PLURAL,
                name,
            )
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create_rayservice(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            self._call(
                f"create RayService {meta['namespace']}/{meta['name']}",
                self._custom.create_namespaced_custom_object,
                RAY_GROUP,
                RAY_VERSION,
                meta["namespace"],
                RAYSERVICE_PLURAL,
                body,
            )
        except KubeError as e:
            if e.status == 404:  # the namespace exists (Models are in it): the API does not
                raise KubeError(
                    f"{e}: the cluster does not serve {RAY_GROUP}/{RAY_VERSION} RayService; "
                    "install the KubeRay operator (its CRDs) first",
                    status=404,
                ) from None
            raise

    def patch_rayservice_serve_config(self, namespace: str, name: str, serve_config_v2: str) -> None:
        self._call(
            f"patch the serveConfigV2 of RayService {namespace}/{name}",
            self._custom.patch_namespaced_custom_object,
            RAY_GROUP,
            RAY_VERSION,
            namespace,
            RAYSERVICE_PLURAL,
            name,
            {"spec": {"serveConfigV2": serve_config_v2}},
            _content_type="application/merge-patch+json",
        )

    def post_event(self, event: ObjectEvent) -> None:
        from kubernetes import client

        self._call(
            f"post Event {event.reason} on Model {event.namespace}/{event.name}",
            self._core.create_namespaced_event,
            event.namespace,
            client.CoreV1Event.from_dict(event_body(event)),
        )


def _api_reason(e: Any) -> str:
    """The API server's Status message, when the body is one; else the HTTP reason."""
    import json

    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or e.reason or "no reason given")
