"""The platform's serve config: which models, which revisions, how they are deployed.

One pydantic schema shared by `expertmesh serve --config` and the operator, which
generates exactly this from `Model` resources. The router's traffic table is the
part that changes during a rollout; it travels as the router's Serve
`user_config`, so a weight change is a reconfigure, not a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from expertmesh.engine.config import EngineConfig
from expertmesh.errors import ExpertMeshError, describe_validation_error

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?$"
MAX_REPLICA_CPUS = 4096  # what one replica may reserve in Ray
MAX_THREADS = 256  # torch intra-op threads one replica may run


class ConfigError(ExpertMeshError):
    """A serve config that cannot be deployed; the message names the field."""


class ExpertParallelSpec(BaseModel):
    """Disaggregated experts: one Ray Serve pool per expert group."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    groups: int | None = Field(
        None,
        ge=1,
        le=256,
        description="expert groups; default: the routing's own groups (MoGE, DeepSeek's n_group), else see default_groups",
    )
    replicas_per_group: int = Field(1, ge=1, le=64)


class ReplicaResources(BaseModel):
    """What Ray reserves for each replica of a deployment (its `ray_actor_options`). Ray places a
    replica only where the reservation fits, and the Ray autoscaler adds nodes for one that does
    not; with nothing reserved, replicas share whatever node they land on."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0, ge=0, le=MAX_REPLICA_CPUS, description="CPUs reserved per replica; 0: none")
    memory_bytes: int | None = Field(None, ge=1, description="memory reserved per replica; None: none")

    def ray_actor_options(self) -> dict:
        options: dict = {"num_cpus": self.num_cpus}
        if self.memory_bytes is not None:
            options["memory"] = self.memory_bytes
        return options


class RevisionResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: ReplicaResources = Field(default_factory=ReplicaResources)
    experts: ReplicaResources = Field(default_factory=ReplicaResources, description="each expert replica")


class RevisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("v1", pattern=NAME_PATTERN, description="revision id, e.g. the model version")
    source: str = Field(..., min_length=1, description="checkpoint directory (HF layout)")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    engine_replicas: int = Field(1, ge=1, le=64)
    engine_routing: Literal["prefix_aware", "least_loaded"] = Field(
        "prefix_aware",
        description="how requests spread over engine replicas: prefix_aware sends a prompt to the "
        "replica that most likely caches its start (unless its queue is 4 longer than the "
        "shortest); least_loaded ignores prompts",
    )
    engine_threads: int = Field(
        1, ge=1, le=MAX_THREADS, description="torch intra-op threads of each engine replica"
    )
    expert_threads: int = Field(
        1, ge=1, le=MAX_THREADS, description="torch intra-op threads of each expert replica"
    )
    expert_parallel: ExpertParallelSpec = Field(default_factory=ExpertParallelSpec)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    resources: RevisionResources = Field(default_factory=RevisionResources)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN)
    revisions: list[RevisionSpec] = Field(..., min_length=1, max_length=8)
    traffic: dict[str, int] | None = Field(None, description="revision -> percent; default: 100 to the first")

    @model_validator(mode="after")
    def _check_traffic(self) -> ModelSpec:
        names = [r.name for r in self.revisions]
        if len(set(names)) != len(names):
            raise ValueError(f"revision names must be unique, got {names}")
        if self.traffic is not None:
            unknown = set(self.traffic) - set(names)
            if unknown:
                raise ValueError(f"traffic names unknown revisions {sorted(unknown)}; known: {names}")
            if any(w < 0 for w in self.traffic.values()) or sum(self.traffic.values()) != 100:
                raise ValueError(f"traffic weights must be >= 0 and sum to 100, got {self.traffic}")
        return self

    def weights(self) -> dict[str, int]:
        return dict(self.traffic) if self.traffic is not None else {self.revisions[0].name: 100}


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(
        ..., description="may be empty: the Router alone, answering every request with model-not-found"
    )
    api_key: str | None = Field(None, min_length=8, repr=False)
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)

    @model_validator(mode="after")
    def _unique_models(self) -> ServeConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read serve config ({exc})") from exc
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw: object, source: str = "serve config") -> ServeConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe_validation_error(exc, 'field')}") from None


def traffic_table(config: ServeConfig) -> dict[str, dict[str, int]]:
    """The router's user_config: model -> revision -> percent."""
    return {m.name: m.weights() for m in config.models}


def moge_groups_problem(routing: str, routing_groups: int | None, requested: int | None) -> str | None:
    """MoGE's rule: its expert pools are exactly its routing groups (each token sends one row to
    each, which is what balances them). The problem with a `requested` count, or None."""
    if routing != "moge" or requested is None or requested == routing_groups:
        return None
    return (
        f"a MoGE model's expert groups are its {routing_groups} routing groups, got groups={requested}; "
        f"set expertParallel.groups to {routing_groups} or leave it out"
    )


def default_groups(num_experts: int, routing_groups: int | None) -> int:
    """The groups routing itself defines where it has them (MoGE's groups, DeepSeek's n_group);
    otherwise the largest divisor of num_experts that is at most 8."""
    if routing_groups:
        return routing_groups
    return max(g for g in range(1, 9) if num_experts % g == 0)
