"""The `Model` custom resource: pydantic spec and status, and the CRD generated from them.

The pydantic models are the one source of truth. `crd_manifest()` turns their JSON
schema into a Kubernetes *structural* OpenAPI v3 schema (refs inlined, no `anyOf`
with null, no titles), and `python -m expertmesh_operator.crd` prints the CRD YAML
committed at helm/expertmesh/crds/.
"""

from __future__ import annotations

import copy
import sys
from datetime import datetime, timezone
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "serving.expertmesh.io"
VERSION = "v1alpha1"
KIND = "Model"
PLURAL = "models"
CRD_NAME = f"{PLURAL}.{GROUP}"
ROLLOUT_ANNOTATION = f"{GROUP}/rollout"
# Held by every Model the operator has deployed, so a deletion waits until its deployments are gone.
FINALIZER = f"{GROUP}/serve-config"

# DNS-label-like names; they become parts of Ray Serve deployment names.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?$"
# Kubernetes resource.Quantity, as the API server's own regex.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Where the operator's RayService mounts a PVC source: /mnt/models/<claimName>/<path>.
PVC_MOUNT_ROOT = "/mnt/models"


class CamelModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class PVCSource(CamelModel):
    claim_name: str = Field(..., pattern=NAME_PATTERN, max_length=63)
    path: str = Field("", max_length=1024, description="directory inside the volume")


class ModelSource(CamelModel):
    """Where the checkpoint (HF layout) is: a path every Ray node sees, or a PVC."""

    checkpoint: str | None = Field(None, min_length=1, max_length=1024)
    pvc: PVCSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.checkpoint is None) == (self.pvc is None):
            raise ValueError("source needs exactly one of 'checkpoint' or 'pvc'")
        return self

    def path(self) -> str:
        """The checkpoint directory as the serving replicas see it."""
        if self.checkpoint is not None:
            return self.checkpoint
        assert self.pvc is not None
        parts = (self.pvc.claim_name, *self.pvc.path.strip("/").split("/"))
        return "/".join((PVC_MOUNT_ROOT, *(p for p in parts if p)))


class ArchitectureOverrides(CamelModel):
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    num_experts: int | None = Field(
        None, ge=1, le=4096, description="when the checkpoint's config.json cannot be read by the operator"
    )


class ExpertParallel(CamelModel):
    enabled: bool = False
    groups: int | None = Field(None, ge=1, le=256, description="default: MoGE's routing groups")
    replicas_per_group: int = Field(1, ge=1, le=64)
    min_replicas_per_group: int = Field(1, ge=1, le=64)
    max_replicas_per_group: int = Field(8, ge=1, le=64)


class ResourceList(CamelModel):
    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN, max_length=32)
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN, max_length=32)


class PoolResources(CamelModel):
    requests: ResourceList = Field(default_factory=ResourceList)
    limits: ResourceList = Field(default_factory=ResourceList)


class Resources(CamelModel):
    engine: PoolResources = Field(
        default_factory=PoolResources,
        description="Ray reserves the requests (default: the limits) for each engine replica; "
        "its torch threads are the whole CPUs of the limit, else of the request",
    )
    experts: PoolResources = Field(
        default_factory=PoolResources, description="the same for each replica of every expert pool"
    )


class AutoscalingTargets(CamelModel):
    """Per-replica targets, like an HPA's; a signal without a target is not used."""

    enabled: bool = True
    queue_depth_per_replica: float | None = Field(4.0, ge=0.01, le=1e6)
    ongoing_requests_per_replica: float | None = Field(None, ge=0.01, le=1e6)
    tokens_per_second_per_replica: float | None = Field(None, ge=0.01, le=1e9)
    tpot_p95_seconds: float | None = Field(None, ge=0.0001, le=600)
    tolerance: float = Field(0.1, ge=0, le=1)
    scale_up_stabilization_seconds: int = Field(0, ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=3600)
    max_step_replicas: int = Field(4, ge=1, le=64)
    metrics_max_age_seconds: int = Field(120, ge=1, le=3600, description="older samples are stale")


class CanaryAnalysis(CamelModel):
    max_error_ratio: float = Field(
        0.01, ge=0, le=1, description="canary error ratio may exceed stable's by at most this"
    )
    max_p95_latency_ratio: float = Field(1.25, ge=1, le=100, description="canary p95 / stable p95, at most")
    min_requests: int = Field(0, ge=0, le=1_000_000, description="canary requests before a step is judged")


class CanaryStrategy(CamelModel):
    steps: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1, max_length=20)
    pause_seconds: int = Field(60, ge=0, le=86400)
    analysis: CanaryAnalysis = Field(default_factory=CanaryAnalysis)


class RolloutStrategy(CamelModel):
    canary: CanaryStrategy = Field(default_factory=CanaryStrategy)


class Speculative(CamelModel):
    """Speculative decoding of greedy requests (the engine's SpeculativeConfig, in camelCase)."""

    method: Literal["ngram"] = Field("ngram", description="ngram: prompt lookup")
    num_tokens: int = Field(4, ge=1, le=16, description="tokens proposed per step and sequence, at most")
    ngram_max: int = Field(4, ge=1, le=16)
    ngram_min: int = Field(1, ge=1, le=16, description="at most ngramMax")


class Limits(CamelModel):
    max_context: int | None = Field(None, ge=2, le=10_000_000)
    max_batch_tokens: int = Field(1024, ge=16, le=10_000_000)
    max_num_seqs: int = Field(64, ge=1, le=100_000)


class ModelResourceSpec(CamelModel):
    source: ModelSource
    version: str = Field("v1", pattern=NAME_PATTERN, max_length=63, description="a change makes a revision")
    served_name: str | None = Field(
        None, pattern=NAME_PATTERN, max_length=63, description="name clients use; default metadata.name"
    )
    architecture: ArchitectureOverrides = Field(default_factory=ArchitectureOverrides)
    expert_parallel: ExpertParallel = Field(default_factory=ExpertParallel)
    engine_replicas: int = Field(1, ge=1, le=64)
    engine_routing: Literal["prefix_aware", "least_loaded"] = Field(
        "prefix_aware",
        description="over engine replicas: prefix_aware sends a prompt to the replica most likely to "
        "cache its start; least_loaded ignores prompts",
    )
    prefix_caching: bool = Field(
        True, description="reuse KV cache blocks of prompt starts earlier requests computed (as vLLM)"
    )
    speculative: Speculative | None = Field(None, description="speculative decoding; off when absent")
    min_engine_replicas: int = Field(1, ge=1, le=64)
    max_engine_replicas: int = Field(8, ge=1, le=64)
    resources: Resources = Field(default_factory=Resources)
    autoscaling: AutoscalingTargets = Field(default_factory=AutoscalingTargets)
    rollout: RolloutStrategy = Field(default_factory=RolloutStrategy)
    limits: Limits = Field(default_factory=Limits)


# ---- status -------------------------------------------------------------------------------------


def rfc3339(at: float) -> str:
    """A Kubernetes timestamp (conditions' lastTransitionTime, Events) from a Unix time."""
    return datetime.fromtimestamp(at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Condition(CamelModel):
    type: Literal["Ready", "Progressing", "Degraded", "ScalingActive"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., max_length=128, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=4096)
    last_transition_time: str = Field(..., max_length=64, description="RFC 3339")


class RevisionTraffic(CamelModel):
    name: str = Field(..., pattern=NAME_PATTERN, max_length=63)
    traffic: int = Field(..., ge=0, le=100)


class RevisionRecord(CamelModel):
    """A revision as deployed: the spec it was made from, so it keeps serving after the spec moves on."""

    name: str = Field(..., pattern=NAME_PATTERN, max_length=63)
    key: str = Field(..., max_length=64, description="hash of the revision-defining spec fields")
    spec: ModelResourceSpec


class RolloutState(CamelModel):
    """The canary state machine's state; it lives in status so an operator restart resumes it."""

    phase: Literal["Stable", "Progressing", "RolledBack", "Aborted"] = "Stable"
    stable: RevisionRecord | None = None
    canary: RevisionRecord | None = None
    step_index: int = Field(0, ge=0, le=20)
    step_started_at: float | None = Field(None, ge=0)
    rejected_key: str | None = Field(None, max_length=64, description="a revision rolled back or aborted")
    message: str = Field("", max_length=4096)


class ScaleRecommendation(CamelModel):
    """A replica count the autoscaler recommended for a pool, and when it last did."""

    at: float = Field(..., ge=0)
    replicas: int = Field(..., ge=0)


class AutoscalingStatus(CamelModel):
    """The autoscaler's memory: kept in status so the stabilisation windows survive a restart."""

    history: dict[str, list[ScaleRecommendation]] = Field(
        default_factory=dict, description="per pool: each recommended count at the latest time it was"
    )
    held_pools: list[str] = Field(default_factory=list, description="pools held for want of metrics")


class ModelResourceStatus(CamelModel):
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    observed_generation: int | None = Field(None, ge=0)
    revisions: list[RevisionTraffic] = Field(default_factory=list, max_length=8)
    replicas_per_pool: dict[str, int] = Field(default_factory=dict)
    endpoint: str | None = Field(None, max_length=1024)
    # flat copies for `kubectl get models` printer columns
    ready: Literal["True", "False", "Unknown"] = "Unknown"
    revision: str | None = Field(None, max_length=63)
    traffic: str | None = Field(None, max_length=256)
    replicas: int = Field(0, ge=0)
    rollout: RolloutState | None = None
    autoscaling: AutoscalingStatus | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ModelResource(BaseModel):
    """A `Model` object as the operator needs it: identity, generation, annotations, parsed spec."""

    model_config = ConfigDict(frozen=True)

    name: str
    namespace: str = "default"
    generation: int = 1
    annotations: dict[str, str] = Field(default_factory=dict)
    spec: ModelResourceSpec
    status: ModelResourceStatus | None = None

    @property
    def served_name(self) -> str:
        return self.spec.served_name or self.name

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> ModelResource:
        meta = obj.get("metadata") or {}
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            generation=meta.get("generation", 1),
            annotations=meta.get("annotations") or {},
            spec=ModelResourceSpec.model_validate(obj.get("spec") or {}),
            status=ModelResourceStatus.model_validate(obj["status"]) if obj.get("status") else None,
        )


# ---- CRD generation -----------------------------------------------------------------------------

# JSON-schema keys a structural OpenAPI v3 schema in a CRD may carry.
_ALLOWED_KEYS = {
    "type", "properties", "required", "items", "additionalProperties", "enum", "default", "description",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "nullable",
    "format", "oneOf", "anyOf", "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, rewritten as a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    node = dict(node)
    if "anyOf" in node:
        # Optional[X] -> X, nullable; the only union our models use
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"unions other than Optional are not structural: {branches}")
        node = {**branches[0], **node, "nullable": True}
        if node.get("default", 0) is None:
            del node["default"]  # a null default is the same as none, and pruning rejects it
        return _structural(node, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" or (key == "additionalProperties" and value is False):
            continue  # titles are noise; unknown fields are pruned by the API server, not forbidden
        if key not in _ALLOWED_KEYS:
            raise ValueError(f"schema key {key!r} has no structural equivalent")
        if key == "properties":
            value = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = _structural(value, defs)
        out[key] = value
    return out


def _with_exactly_one_source(spec_schema: dict[str, Any]) -> dict[str, Any]:
    # pydantic's model validator is invisible to JSON schema; say it with oneOf/required
    source = spec_schema["properties"]["source"]
    source["oneOf"] = [{"required": ["checkpoint"]}, {"required": ["pvc"]}]
    for branch in source["properties"].values():
        branch.pop("nullable", None)
    return spec_schema


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema for the whole object."""
    return {
        "type": "object",
        "description": "An LLM served by expertmesh: source, expert parallelism, autoscaling, rollout.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _with_exactly_one_source(structural_schema(ModelResourceSpec)),
            "status": structural_schema(ModelResourceStatus),
        },
    }


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "model",
                "shortNames": ["mdl"],
                "categories": ["expertmesh"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                        {"name": "Revision", "type": "string", "jsonPath": ".status.revision"},
                        {"name": "Traffic", "type": "string", "jsonPath": ".status.traffic"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `python -m expertmesh_operator.crd`; do not edit by hand.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(crd_yaml())
