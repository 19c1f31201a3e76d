from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from expertmesh.config import ServeConfig
from expertmesh.model.config import ModelConfig, MoEConfig
from expertmesh.serve_layout import platform_config, serve_deploy_config
from expertmesh_operator.crd import ROLLOUT_ANNOTATION, ModelResource
from expertmesh_operator.reconcile import ObservedState, rayservice_manifest, reconcile
from expertmesh_operator.rollout import AnalysisResult

T0 = 1_700_000_000.0
PANGU = ModelConfig(
    family="pangu_pro_moe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    moe=MoEConfig(routing="moge", num_experts=64, num_experts_per_tok=8, moe_intermediate_size=16),
)  # fmt: skip
OBSERVED = ObservedState(model_configs={"/ckpt/pangu": PANGU}, endpoint="http://expertmesh-serve-svc:8000")


def model(name="pangu", generation=1, annotations=None, status=None, **spec) -> ModelResource:
    spec = {"source": {"checkpoint": f"/ckpt/{name}"}, "rollout": {"canary": {"pauseSeconds": 60}}} | spec
    return ModelResource(
        name=name, generation=generation, annotations=annotations or {}, spec=spec, status=status
    )


def run(models, observed=OBSERVED, now=T0, previous=None):
    """One reconcile, with rollout states taken from the models' stored status as the operator does."""
    states = {m.name: (m.status.rollout if m.status else None) for m in models}
    return reconcile(models, observed, states, now)


def with_status(models, result):
    return [m.model_copy(update={"status": result.statuses[m.name]}) for m in models]


def app_args(result) -> ServeConfig:
    ServeDeploySchema.model_validate(result.serve_config_v2)  # Serve accepts it
    return platform_config(result.serve_config_v2)


def router_traffic(result):
    return result.serve_config_v2["applications"][0]["deployments"][0]["user_config"]["traffic"]


def test_builds_serve_config_and_status():
    models = [
        model(expertParallel={"enabled": True, "replicasPerGroup": 2}),
        model("llama", engineReplicas=2),
    ]
    result = run(models)
    config = app_args(result)
    assert [m.name for m in config.models] == ["llama", "pangu"]
    pangu = config.models[1].revisions[0]
    assert (pangu.source, pangu.expert_parallel.enabled, pangu.expert_parallel.replicas_per_group) == (
        "/ckpt/pangu", True, 2,
    )  # fmt: skip
    assert router_traffic(result) == {"llama": {"v1": 100}, "pangu": {"v1": 100}}
    status = result.statuses["pangu"]
    assert status.ready == "True" and status.revision == "v1" and status.traffic == "v1=100"
    assert status.observed_generation == 1 and status.endpoint == OBSERVED.endpoint
    assert status.replicas_per_pool["engine-pangu-v1"] == 1
    assert [status.replicas_per_pool[f"experts-pangu-v1-g{g}"] for g in range(8)] == [2] * 8
    assert status.replicas == 17
    assert {c.type: c.status for c in status.conditions} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
    }
    assert [(e.model, e.reason) for e in result.events] == [
        ("llama", "RevisionCreated"),
        ("pangu", "RevisionCreated"),
    ]


def test_idempotent_when_nothing_changes():
    models = [model()]
    first = run(models)
    models = with_status(models, first)
    second = run(models, now=T0 + 30)
    third = run(models, now=T0 + 60)
    assert second.serve_config_v2 == first.serve_config_v2 == third.serve_config_v2
    assert second.statuses == first.statuses == third.statuses  # transition times did not move
    assert second.events == third.events == []


def test_invalid_new_model_is_degraded_and_not_deployed():
    bad = model("qwen", expertParallel={"minReplicasPerGroup": 4, "maxReplicasPerGroup": 2})
    result = run([model(), bad])
    assert [m.name for m in app_args(result).models] == ["pangu"]
    status = result.statuses["qwen"]
    degraded = status.condition("Degraded")
    assert (
        degraded.status == "True"
        and degraded.reason == "InvalidSpec"
        and "minReplicasPerGroup" in degraded.message
    )
    assert status.ready == "False" and status.revisions == []
    assert [e.reason for e in result.events if e.model == "qwen"] == ["InvalidSpec"]
    again = run(with_status([model(), bad], result), now=T0 + 30)
    assert [e for e in again.events if e.model == "qwen"] == []  # the warning is posted once


def test_invalid_update_keeps_the_previous_revision_serving():
    models = [model()]
    models = with_status(models, run(models))
    broken = [
        model(
            version="v2", generation=2, expertParallel={"enabled": True, "groups": 7}, status=models[0].status
        )
    ]
    result = run(broken, now=T0 + 10)
    assert router_traffic(result) == {"pangu": {"v1": 100}}
    assert app_args(result).models[0].revisions[0].source == "/ckpt/pangu"
    status = result.statuses["pangu"]
    assert status.ready == "True" and status.condition("Degraded").reason == "InvalidSpec"
    assert "divide num_experts (64)" in status.condition("Degraded").message
    assert status.observed_generation == 2 and status.rollout.stable.name == "v1"


def test_nothing_valid_leaves_the_router_alone_as_the_chart_installs_it():
    result = run([model(engineReplicas=20)])
    assert result.serve_config_v2 == serve_deploy_config(ServeConfig(models=[]))
    assert app_args(result).models == []


def test_canary_traffic_reaches_the_router_only():
    models = with_status([model()], run([model()]))
    v2 = [model(version="v2", generation=2, status=models[0].status)]
    result = run(v2, now=T0 + 1)
    assert router_traffic(result) == {"pangu": {"v1": 90, "v2": 10}}
    assert [r.name for r in app_args(result).models[0].revisions] == ["v1", "v2"]
    status = result.statuses["pangu"]
    assert status.condition("Progressing").status == "True" and status.traffic == "v1=90,v2=10"

    # the step to 50% changes the Router's user_config and nothing else
    analysis = AnalysisResult(
        window_start=T0 + 1, canary_requests=50, canary_error_ratio=0, stable_error_ratio=0,
        canary_p95_seconds=0.1, stable_p95_seconds=0.1,
    )  # fmt: skip
    observed = OBSERVED.model_copy(update={"analyses": {"pangu": analysis}})
    stepped = run(with_status(v2, result), observed=observed, now=T0 + 61)
    assert router_traffic(stepped) == {"pangu": {"v1": 50, "v2": 50}}
    # the step reconfigures the Router only: every revision's application stays as it was
    before, after = result.serve_config_v2["applications"], stepped.serve_config_v2["applications"]
    assert before[1:] == after[1:] and [a["name"] for a in after[1:]] == ["pangu-v1", "pangu-v2"]
    assert [e.reason for e in stepped.events] == ["CanaryStep"]


def test_abort_annotation_returns_traffic_and_degrades():
    models = with_status([model()], run([model()]))
    v2 = with_status(
        [model(version="v2", status=models[0].status)],
        run([model(version="v2", status=models[0].status)], now=T0 + 1),
    )
    aborted = run([v2[0].model_copy(update={"annotations": {ROLLOUT_ANNOTATION: "abort"}})], now=T0 + 2)
    assert router_traffic(aborted) == {"pangu": {"v1": 100}}
    assert aborted.statuses["pangu"].condition("Degraded").reason == "RolloutAborted"


def test_autoscaler_replicas_become_deployment_overrides():
    observed = OBSERVED.model_copy(
        update={
            "replicas": {"pangu": {"engine-pangu-v1": 3, **{f"experts-pangu-v1-g{g}": 4 for g in range(8)}}}
        }
    )
    result = run([model(expertParallel={"enabled": True})], observed=observed)
    (app,) = [a for a in result.serve_config_v2["applications"] if a["name"] == "pangu-v1"]
    assert {"name": "engine-pangu-v1", "num_replicas": 3} in app["deployments"]
    assert {"name": "experts-pangu-v1-g7", "num_replicas": 4} in app["deployments"]
    assert result.statuses["pangu"].replicas == 3 + 8 * 4
    ServeDeploySchema.model_validate(result.serve_config_v2)


def test_duplicate_served_names_degrade_the_second():
    result = run([model("a", servedName="shared"), model("b", servedName="shared")])
    assert [m.name for m in app_args(result).models] == ["shared"]
    assert result.statuses["b"].condition("Degraded").reason == "InvalidSpec"


def test_rayservice_manifest():
    result = run([model()])
    cluster = {"headGroupSpec": {"rayStartParams": {}}, "workerGroupSpecs": []}
    obj = rayservice_manifest("expertmesh", "ml", result.serve_config_v2, cluster)
    assert (obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"]) == ("ray.io/v1", "RayService", "ml")
    assert yaml.safe_load(obj["spec"]["serveConfigV2"]) == result.serve_config_v2
    assert obj["spec"]["rayClusterConfig"] is cluster
    assert rayservice_manifest("expertmesh", "ml", result.serve_config_v2, cluster) == obj


def test_resources_become_each_replicas_ray_reservation_and_threads():
    resources = {
        "engine": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
        "experts": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "2"}},
    }
    result = run([model(expertParallel={"enabled": True}, resources=resources)])
    (revision,) = app_args(result).models[0].revisions
    assert revision.resources.engine.ray_actor_options() == {"num_cpus": 4.0, "memory": 16 * 2**30}
    assert revision.resources.experts.ray_actor_options() == {"num_cpus": 0.5, "memory": 2 * 2**30}
    assert (revision.engine_threads, revision.expert_threads) == (4, 2)


def test_a_resources_change_keeps_the_revision_and_follows_into_its_app():
    first = run([model(resources={"engine": {"requests": {"cpu": "2"}}})])
    models = with_status([model(generation=2, resources={"engine": {"requests": {"cpu": "6"}}})], first)
    second = run(models, now=T0 + 10)
    (revision,) = app_args(second).models[0].revisions
    assert revision.name == "v1" and revision.resources.engine.num_cpus == 6.0  # no canary for it
    assert second.statuses["pangu"].rollout.phase == "Stable"


def test_prefix_caching_and_engine_routing_reach_the_revision_in_place():
    (default,) = app_args(run([model()])).models[0].revisions
    assert default.engine.enable_prefix_caching and default.engine_routing == "prefix_aware"
    first = run([model()])
    models = with_status([model(generation=2, prefixCaching=False, engineRouting="least_loaded")], first)
    second = run(models, now=T0 + 10)
    (revision,) = app_args(second).models[0].revisions
    assert revision.name == "v1" and second.statuses["pangu"].rollout.phase == "Stable"  # no canary
    assert not revision.engine.enable_prefix_caching and revision.engine_routing == "least_loaded"


def test_speculative_decoding_reaches_the_engine_and_a_bad_range_is_named():
    (revision,) = app_args(run([model(speculative={"numTokens": 3})])).models[0].revisions
    assert revision.engine.speculative.num_tokens == 3 and revision.engine.speculative.method == "ngram"
    bad = run([model(speculative={"ngramMin": 5, "ngramMax": 2})])
    degraded = bad.statuses["pangu"].condition("Degraded")
    assert degraded.status == "True" and "speculative.ngramMin (5) must not exceed" in degraded.message
