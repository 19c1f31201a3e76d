"""Checks on a Model spec that its OpenAPI schema cannot express.

Each returns human-readable problems; an empty list means the spec can be deployed.
The checkpoint's `ModelConfig` is passed in when the operator could read it, so the
expert layout is checked against the real model, not a guess.
"""

from __future__ import annotations

from expertmesh.config import MAX_REPLICA_CPUS, moge_groups_problem
from expertmesh.model.config import ModelConfig
from expertmesh_operator.crd import ModelResourceSpec
from expertmesh_operator.resources import quantity


def spec_problems(spec: ModelResourceSpec, model_config: ModelConfig | None = None) -> list[str]:
    return [
        *_replica_bounds(spec),
        *_canary_steps(spec),
        *_expert_layout(spec, model_config),
        *_limits(spec, model_config),
        *_autoscaling(spec),
        *_resources(spec),
        *_speculative(spec),
    ]


def _speculative(spec: ModelResourceSpec) -> list[str]:
    s = spec.speculative
    if s is not None and s.ngram_min > s.ngram_max:
        return [f"speculative.ngramMin ({s.ngram_min}) must not exceed speculative.ngramMax ({s.ngram_max})"]
    return []


def _resources(spec: ModelResourceSpec) -> list[str]:
    """Quantities Ray can reserve: readable, not negative, a request not above its limit (as
    Kubernetes asks). The schema's pattern admits a fractional exponent ("1e1.5"), which
    Kubernetes' own parser refuses: it is reported here, not left to fail the reconcile."""
    problems = []
    for pool_name, pool in (("engine", spec.resources.engine), ("experts", spec.resources.experts)):
        for kind in ("cpu", "memory"):
            values = {}  # "requests" / "limits" -> (text, value), for the ones that are set and valid
            for where in ("requests", "limits"):
                text = getattr(getattr(pool, where), kind)
                if text is None:
                    continue
                field = f"resources.{pool_name}.{where}.{kind}"
                try:
                    value = quantity(text)
                except ValueError:
                    problems.append(f"{field} ({text}) is not a Kubernetes quantity")
                    continue
                if value < 0:
                    problems.append(f"{field} ({text}) must not be negative")
                if kind == "cpu" and value > MAX_REPLICA_CPUS:
                    problems.append(f"{field} ({text}) must be at most {MAX_REPLICA_CPUS}")
                values[where] = (text, value)
            if len(values) == 2 and values["requests"][1] > values["limits"][1]:
                problems.append(
                    f"resources.{pool_name}.requests.{kind} ({values['requests'][0]}) must not exceed "
                    f"resources.{pool_name}.limits.{kind} ({values['limits'][0]})"
                )
    return problems


def _replica_bounds(spec: ModelResourceSpec) -> list[str]:
    ep = spec.expert_parallel
    found = [
        _bounds_problem(
            "expertParallel.", "replicasPerGroup", ep.replicas_per_group,
            "minReplicasPerGroup", ep.min_replicas_per_group, "maxReplicasPerGroup", ep.max_replicas_per_group,
        ),
        _bounds_problem(
            "", "engineReplicas", spec.engine_replicas,
            "minEngineReplicas", spec.min_engine_replicas, "maxEngineReplicas", spec.max_engine_replicas,
        ),
    ]  # fmt: skip
    return [problem for problem in found if problem]


def _bounds_problem(
    prefix: str, name: str, value: int, min_name: str, low: int, max_name: str, high: int
) -> str | None:
    """A min above its max, else a replica count outside [min, max]; None when all is well."""
    if low > high:
        return f"{prefix}{min_name} ({low}) is above {max_name} ({high}); lower the min or raise the max"
    if not low <= value <= high:
        return f"{prefix}{name} ({value}) must be within [{low}, {high}]"
    return None


def _canary_steps(spec: ModelResourceSpec) -> list[str]:
    steps = spec.rollout.canary.steps
    problems = []
    if any(not 0 < s <= 100 for s in steps):
        problems.append(f"rollout.canary.steps must be percentages in (0, 100], got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        problems.append(f"rollout.canary.steps must strictly increase, got {steps}")
    if steps[-1] != 100:
        problems.append(f"rollout.canary.steps must end at 100, got {steps}")
    return problems


def _expert_layout(spec: ModelResourceSpec, cfg: ModelConfig | None) -> list[str]:
    ep = spec.expert_parallel
    if not ep.enabled:
        return []
    if cfg is not None and cfg.moe is None:
        return [f"expertParallel.enabled needs an MoE model; {spec.source.path()} is dense ({cfg.family})"]
    num_experts = cfg.moe.num_experts if cfg is not None and cfg.moe else spec.architecture.num_experts
    problems = []
    if ep.groups is not None and num_experts is not None and num_experts % ep.groups:
        problems.append(
            f"expertParallel.groups ({ep.groups}) must divide num_experts ({num_experts}); "
            f"try one of {[g for g in range(1, min(num_experts, 256) + 1) if num_experts % g == 0]}"
        )
    problem = (
        moge_groups_problem(cfg.moe.routing, cfg.moe.routing_groups, ep.groups)
        if cfg is not None and cfg.moe is not None
        else None
    )
    return problems + ([problem] if problem else [])


def _limits(spec: ModelResourceSpec, cfg: ModelConfig | None) -> list[str]:
    problems = []
    lim = spec.limits
    if lim.max_batch_tokens < lim.max_num_seqs:
        problems.append(
            f"limits.maxBatchTokens ({lim.max_batch_tokens}) must be at least limits.maxNumSeqs "
            f"({lim.max_num_seqs}) so every running sequence can decode each step"
        )
    if cfg is not None and lim.max_context is not None and lim.max_context > cfg.max_position_embeddings:
        problems.append(
            f"limits.maxContext ({lim.max_context}) exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    return problems


def _autoscaling(spec: ModelResourceSpec) -> list[str]:
    a = spec.autoscaling
    signals = (
        a.queue_depth_per_replica,
        a.ongoing_requests_per_replica,
        a.tokens_per_second_per_replica,
        a.tpot_p95_seconds,
    )
    if a.enabled and all(s is None for s in signals):
        return ["autoscaling.enabled needs at least one target (queueDepthPerReplica, ...) or enabled: false"]
    return []
