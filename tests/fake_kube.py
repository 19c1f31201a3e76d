"""FakeKubernetesApi: an in-memory stand-in for `expertmesh_operator.kube.KubernetesApi`.

A FAKE for fast unit tests, not shipped. It keeps what the API server would for the calls the
operator makes: resourceVersion and generation bumps, finalizers holding a deletion, 404/409
answers, and it records every write the operator makes in `writes` so tests can assert
"no change, no write". `apply_model` and `delete_model` play the user's `kubectl`; they are
not writes of the operator.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

from expertmesh_operator.kube import ConflictError, KubeError, ObjectEvent

MODEL_API = "serving.expertmesh.io/v1alpha1"


class FakeKubernetesApi:
    def __init__(self) -> None:
        self.models: dict[tuple[str, str], dict[str, Any]] = {}
        self.rayservices: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[ObjectEvent] = []
        self.writes: list[tuple[str, str]] = []
        self._versions = itertools.count(1)
        self._uids = itertools.count(1)

    # ---- the user's side ------------------------------------------------------------------------

    def apply_model(
        self,
        name: str,
        spec: dict[str, Any],
        namespace: str = "default",
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        key = (namespace, name)
        obj = self.models.get(key)
        if obj is None:
            obj = {
                "apiVersion": MODEL_API,
                "kind": "Model",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": f"uid-{next(self._uids)}",
                    "generation": 1,
                    "creationTimestamp": "2024-01-01T00:00:00Z",
                },
                "spec": copy.deepcopy(spec),
            }
            self.models[key] = obj
        elif obj["spec"] != spec:
            obj["spec"] = copy.deepcopy(spec)
            obj["metadata"]["generation"] += 1  # as the API server does for a spec change
        if annotations is not None:
            obj["metadata"]["annotations"] = dict(annotations)
        self._touch(obj)
        return copy.deepcopy(obj)

    def annotate_model(self, name: str, key: str, value: str, namespace: str = "default") -> None:
        obj = self._model(namespace, name)
        obj["metadata"].setdefault("annotations", {})[key] = value
        self._touch(obj)

    def delete_model(self, name: str, namespace: str = "default") -> None:
        obj = self._model(namespace, name)
        if obj["metadata"].get("finalizers"):
            obj["metadata"]["deletionTimestamp"] = "2024-01-01T01:00:00Z"
            self._touch(obj)
        else:
            del self.models[(namespace, name)]

    def model(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        obj = self.models.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    # ---- KubernetesApi --------------------------------------------------------------------------

    def list_models(self, namespaces: Sequence[str] | None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj)
            for (ns, _), obj in sorted(self.models.items())
            if namespaces is None or ns in namespaces
        ]

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.model(name, namespace)

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        obj = self._model(namespace, name)
        obj["status"] = copy.deepcopy(status)
        self._touch(obj)
        self.writes.append(("status", f"{namespace}/{name}"))

    def set_model_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        obj = self._model(namespace, name)
        if obj["metadata"]["resourceVersion"] != resource_version:
            raise ConflictError(f"Model {namespace}/{name} changed since version {resource_version}", 409)
        self.writes.append(("finalizers", f"{namespace}/{name}"))
        obj["metadata"]["finalizers"] = list(finalizers)
        if obj["metadata"].get("deletionTimestamp") and not finalizers:
            del self.models[(namespace, name)]  # the last finalizer gone: the deletion completes
        else:
            self._touch(obj)

    def set_model_annotation(self, namespace: str, name: str, key: str, value: str | None) -> None:
        obj = self._model(namespace, name)
        annotations = obj["metadata"].setdefault("annotations", {})
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
        self._touch(obj)
        self.writes.append(("annotation", f"{namespace}/{name}"))

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.rayservices.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def create_rayservice(self, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if key in self.rayservices:
            raise ConflictError(f"RayService {key[0]}/{key[1]} already exists", 409)
        obj = copy.deepcopy(body)
        self._touch(obj)
        self.rayservices[key] = obj
        self.writes.append(("create rayservice", f"{key[0]}/{key[1]}"))

    def patch_rayservice_serve_config(self, namespace: str, name: str, serve_config_v2: str) -> None:
        obj = self.rayservices.get((namespace, name))
        if obj is None:
            raise KubeError(f"RayService {namespace}/{name} not found", 404)
        obj["spec"]["serveConfigV2"] = serve_config_v2
        self._touch(obj)
        self.writes.append(("patch rayservice", f"{namespace}/{name}"))

    def post_event(self, event: ObjectEvent) -> None:
        self.events.append(event)
        self.writes.append(("event", f"{event.namespace}/{event.name} {event.reason}"))

    # ---- internals ------------------------------------------------------------------------------

    def _model(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.models.get((namespace, name))
        if obj is None:
            raise KubeError(f"Model {namespace}/{name} not found", 404)
        return obj

    def _touch(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
