from __future__ import annotations

from expertmesh.model.config import ModelConfig, MoEConfig
from expertmesh_operator.crd import ModelResourceSpec
from expertmesh_operator.spec_checks import spec_problems

BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
PANGU = ModelConfig(
    family="pangu_pro_moe",
    max_position_embeddings=4096,
    moe=MoEConfig(routing="moge", num_experts=64, num_experts_per_tok=8, moe_intermediate_size=16),
    **BASE,
)
QWEN = ModelConfig(
    family="qwen2_moe",
    moe=MoEConfig(routing="topk", num_experts=60, num_experts_per_tok=4, moe_intermediate_size=16),
    **BASE,
)
LLAMA = ModelConfig(family="llama", intermediate_size=64, **BASE)


def spec(**fields) -> ModelResourceSpec:
    return ModelResourceSpec.model_validate({"source": {"checkpoint": "/ckpt/m"}, **fields})


def test_defaults_are_valid():
    assert spec_problems(spec()) == []
    assert spec_problems(spec(), LLAMA) == []


def test_groups_must_divide_num_experts_from_the_checkpoint():
    problems = spec_problems(spec(expertParallel={"enabled": True, "groups": 7}), QWEN)
    assert len(problems) == 1 and "divide num_experts (60)" in problems[0] and "6" in problems[0]
    assert spec_problems(spec(expertParallel={"enabled": True, "groups": 6}), QWEN) == []


def test_groups_checked_against_override_when_the_checkpoint_is_unreadable():
    bad = spec(expertParallel={"enabled": True, "groups": 5}, architecture={"numExperts": 64})
    assert any("divide num_experts (64)" in p for p in spec_problems(bad))
    assert (
        spec_problems(spec(expertParallel={"enabled": True, "groups": 5})) == []
    )  # nothing to check against


def test_moge_groups_are_its_routing_groups():
    assert spec_problems(spec(expertParallel={"enabled": True, "groups": 8}), PANGU) == []
    problems = spec_problems(spec(expertParallel={"enabled": True, "groups": 4}), PANGU)
    assert problems and "8 routing groups" in problems[0]


def test_dense_model_cannot_disaggregate_experts():
    problems = spec_problems(spec(expertParallel={"enabled": True}), LLAMA)
    assert problems and "dense" in problems[0]


def test_min_replicas_above_max():
    problems = spec_problems(spec(expertParallel={"minReplicasPerGroup": 5, "maxReplicasPerGroup": 2}))
    assert problems == [
        "expertParallel.minReplicasPerGroup (5) is above maxReplicasPerGroup (2); lower the min or raise the max"
    ]
    assert "minEngineReplicas (4)" in spec_problems(spec(minEngineReplicas=4, maxEngineReplicas=2))[0]


def test_initial_replicas_within_bounds():
    assert "replicasPerGroup (9)" in spec_problems(spec(expertParallel={"replicasPerGroup": 9}))[0]
    assert "engineReplicas (9)" in spec_problems(spec(engineReplicas=9))[0]


def test_canary_steps_increase_and_end_at_100():
    assert spec_problems(spec(rollout={"canary": {"steps": [10, 50, 100]}})) == []
    assert spec_problems(spec(rollout={"canary": {"steps": [100]}})) == []
    assert any(
        "strictly increase" in p for p in spec_problems(spec(rollout={"canary": {"steps": [50, 10, 100]}}))
    )
    assert any("end at 100" in p for p in spec_problems(spec(rollout={"canary": {"steps": [10, 50]}})))
    assert any("(0, 100]" in p for p in spec_problems(spec(rollout={"canary": {"steps": [0, 100]}})))


def test_limits():
    assert "maxNumSeqs" in spec_problems(spec(limits={"maxBatchTokens": 32, "maxNumSeqs": 64}))[0]
    assert "max_position_embeddings" in spec_problems(spec(limits={"maxContext": 100000}), PANGU)[0]


def test_autoscaling_needs_a_target():
    assert spec_problems(spec(autoscaling={"queueDepthPerReplica": None}))
    assert spec_problems(spec(autoscaling={"enabled": False, "queueDepthPerReplica": None})) == []


def test_resources_not_negative_and_requests_within_limits():
    assert spec_problems(spec(resources={"engine": {"requests": {"cpu": "2"}, "limits": {"cpu": "4"}}})) == []
    (negative,) = spec_problems(spec(resources={"experts": {"requests": {"memory": "-1Gi"}}}))
    assert negative == "resources.experts.requests.memory (-1Gi) must not be negative"
    (above,) = spec_problems(spec(resources={"engine": {"requests": {"cpu": "8"}, "limits": {"cpu": "4"}}}))
    assert above == "resources.engine.requests.cpu (8) must not exceed resources.engine.limits.cpu (4)"
    (huge,) = spec_problems(spec(resources={"engine": {"requests": {"cpu": "5000"}}}))
    assert huge == "resources.engine.requests.cpu (5000) must be at most 4096"


def test_a_quantity_the_schema_admits_but_kubernetes_refuses_is_a_problem_not_a_crash():
    (unreadable,) = spec_problems(spec(resources={"engine": {"limits": {"cpu": "1e1.5"}}}))
    assert unreadable == "resources.engine.limits.cpu (1e1.5) is not a Kubernetes quantity"
