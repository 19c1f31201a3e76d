"""round_plan.decide and pools_to_measure as pure functions: raw Model dicts in, a Plan out.

No API, no fake of one: each test builds the objects as the API server lists them, and a
"next round" stores the status the previous plan wrote, as the status write would.
"""

from __future__ import annotations

import yaml

from expertmesh.serve_layout import all_deployments
from expertmesh_operator.admission import finalizers_to_add
from expertmesh_operator.conditions import invalid_spec_events
from expertmesh_operator.crd import FINALIZER, ROLLOUT_ANNOTATION, ModelResourceStatus
from expertmesh_operator.operator_settings import OperatorSettings
from expertmesh_operator.pool_autoscale import PoolMetrics
from expertmesh_operator.round_plan import (
    ModelUpdate,
    Observations,
    Plan,
    PoolQuery,
    decide,
    pools_to_measure,
)

T0 = 1_700_000_000.0
SETTINGS = OperatorSettings(namespaces=("default", "team-b"))


def spec(name="llama", version="v1", **extra):
    return {"source": {"checkpoint": f"/ckpt/{name}"}, "version": version} | extra


def model(name="llama", namespace="default", *, finalizers=(FINALIZER,), deleting=False, **spec_extra):
    meta = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{namespace}-{name}",
        "generation": 1,
        "resourceVersion": "7",
        "finalizers": list(finalizers),
    }
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T01:00:00Z"
    return {"metadata": meta, "spec": spec(name, **spec_extra)}


def observed(serve_config=None, **extra) -> Observations:
    return Observations(settings=SETTINGS, serve_config=serve_config, **extra)


def written(plan: Plan) -> dict:
    """The serveConfigV2 the plan writes, as the next round reads it back."""
    assert plan.rayservice is not None
    return yaml.safe_load(plan.rayservice.manifest["spec"]["serveConfigV2"])


def applications(plan: Plan) -> list[str]:
    return [app["name"] for app in written(plan)["applications"]]


def update_of(plan: Plan, name: str, namespace: str = "default") -> ModelUpdate:
    return next(u for u in plan.models if (u.namespace, u.name) == (namespace, name))


def stored(obj: dict, update: ModelUpdate) -> dict:
    """The object after the status write of `update`."""
    assert update.status is not None
    return obj | {"status": update.status.model_dump(mode="json", by_alias=True, exclude_none=True)}


def deployed(obj: dict) -> tuple[dict, dict]:
    """One round on `obj` alone: the object with its status stored, and the serve config written."""
    plan = decide([obj], observed(), None, T0)
    return stored(obj, update_of(plan, obj["metadata"]["name"])), written(plan)


def degraded(update: ModelUpdate):
    assert update.status is not None
    return update.status.condition("Degraded")


def test_a_new_model_creates_the_rayservice_and_writes_its_status():
    obj = model()
    plan = decide([obj], observed(), None, T0)
    assert obj == model()  # decide reads its inputs, never changes them
    assert plan.rayservice is not None and plan.rayservice.action == "create"
    assert applications(plan) == ["expertmesh", "llama-v1"]
    update = update_of(plan, "llama")
    assert update.status is not None and update.status.ready == "True"
    assert sorted(e.reason for e in update.events) == ["AutoscalingNoPrometheus", "RevisionCreated"]
    assert all(e.uid == "uid-default-llama" and e.at == T0 for e in update.events)
    assert plan.releases == []


def test_nothing_to_deploy_creates_no_rayservice():
    assert decide([], observed(), None, T0) == Plan()


def test_same_world_same_time_plans_nothing():
    obj, serve_config = deployed(model())
    assert decide([obj], observed(serve_config), None, T0 + 30) == Plan()


def test_a_changed_serve_config_is_patched():
    obj, serve_config = deployed(model())
    plan = decide([obj], observed({"applications": []}), None, T0 + 30)
    assert plan.rayservice is not None and plan.rayservice.action == "patch"
    assert written(plan) == serve_config and plan.models == []


def test_a_name_taken_in_another_namespace_is_blocked_and_said_once():
    objects = [model(), model(namespace="team-b", engineReplicas=3)]
    plan = decide(objects, observed(), None, T0)
    assert applications(plan) == ["expertmesh", "llama-v1"]
    assert update_of(plan, "llama").status.replicas_per_pool == {"engine-llama-v1": 1}  # default/ wins
    blocked = update_of(plan, "llama", "team-b")
    assert blocked.status is not None and blocked.status.ready == "False"
    cond = degraded(blocked)
    assert (cond.status, cond.reason) == ("True", "InvalidSpec")
    assert cond.message == "a Model named 'llama' is already deployed from namespace default"
    assert [(e.type, e.reason, e.message) for e in blocked.events] == [
        ("Warning", "InvalidSpec", cond.message)
    ]
    assert blocked.clear_rollout_command is None

    # the next round, with both statuses stored: the Degraded message already says it
    objects = [stored(objects[0], update_of(plan, "llama")), stored(objects[1], blocked)]
    assert decide(objects, observed(written(plan)), None, T0 + 30) == Plan()


def test_an_unreadable_spec_keeps_the_stable_revision_serving_frozen():
    obj, serve_config = deployed(model())
    unreadable = obj | {"spec": spec(engineReplicas="many")}
    plan = decide([unreadable], observed(serve_config), None, T0 + 10)
    assert plan.rayservice is None  # v1 keeps serving, untouched
    update = update_of(plan, "llama")
    cond = degraded(update)
    assert (cond.status, cond.reason) == ("True", "InvalidSpec")
    assert cond.message.startswith("the spec cannot be read: engineReplicas")
    assert update.status is not None and update.status.ready == "True" and update.status.traffic == "v1=100"
    assert [e.reason for e in update.events] == ["InvalidSpec"]

    frozen = stored(unreadable, update)
    assert decide([frozen], observed(serve_config), None, T0 + 20) == Plan()  # said once


def test_an_unreadable_spec_without_history_is_blocked():
    plan = decide([model(engineReplicas="many")], observed(), None, T0)
    assert plan.rayservice is None  # nothing deployable: no Ray cluster for nothing
    update = update_of(plan, "llama")
    assert update.status is not None and update.status.ready == "False"
    assert [e.reason for e in update.events] == ["InvalidSpec"]


def test_a_deleted_model_is_released_with_a_removed_event():
    obj, serve_config = deployed(model())
    gone = obj | {"metadata": obj["metadata"] | {"deletionTimestamp": "2024-01-01T01:00:00Z"}}
    gone["metadata"]["finalizers"] = ["someone.else/keep", FINALIZER]
    plan = decide([gone], observed(serve_config), None, T0 + 5)
    assert plan.rayservice is not None and plan.rayservice.action == "patch"
    assert applications(plan) == ["expertmesh"]  # the Router alone answers model-not-found
    assert plan.models == []
    [release] = plan.releases
    change = release.finalizers
    assert (change.namespace, change.name, change.resource_version) == ("default", "llama", "7")
    assert change.finalizers == ["someone.else/keep"]
    assert release.event.reason == "Removed" and release.event.uid == "uid-default-llama"
    assert release.event.message == "deployments of llama removed from RayService default/expertmesh"


def test_a_deleted_model_without_our_finalizer_is_not_ours_to_release():
    assert decide([model(deleting=True, finalizers=())], observed(), None, T0).releases == []


def test_a_live_model_without_our_finalizer_takes_no_part():
    """The shell adds the finalizer first; a Model whose write failed reaches decide without it."""
    bare = model(finalizers=())
    assert decide([bare], observed(), None, T0) == Plan()
    [change] = finalizers_to_add([bare, model("other")])
    assert (change.name, change.finalizers, change.resource_version) == ("llama", [FINALIZER], "7")


def test_a_stale_promote_is_cleared_with_a_warning():
    obj, serve_config = deployed(model())
    obj["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: "promote"}
    plan = decide([obj], observed(serve_config), None, T0 + 1)
    update = update_of(plan, "llama")
    assert update.status is None and update.events == []  # nothing else changed
    clear = update.clear_rollout_command
    assert clear is not None and clear.annotation == ROLLOUT_ANNOTATION
    assert clear.warning is not None and clear.warning.reason == "RolloutCommandIgnored"
    assert clear.warning.type == "Warning" and "no canary is in progress" in clear.warning.message


def test_a_promote_during_a_canary_is_consumed_without_a_warning():
    obj, serve_config = deployed(model())
    v2 = obj | {"spec": spec(version="v2")}
    canary = stored(v2, update_of(decide([v2], observed(serve_config), None, T0 + 1), "llama"))
    assert canary["status"]["rollout"]["phase"] == "Progressing"
    canary["metadata"]["annotations"] = {ROLLOUT_ANNOTATION: "promote"}
    update = update_of(decide([canary], observed(), None, T0 + 2), "llama")
    assert "Promoted" in [e.reason for e in update.events]
    assert update.clear_rollout_command is not None and update.clear_rollout_command.warning is None


def test_decide_scales_on_the_load_of_the_pools_named_to_measure():
    obj = model(autoscaling={"queueDepthPerReplica": 4})
    assert pools_to_measure([obj], observed(), T0) == [
        PoolQuery(model="llama", served_name="llama", revision="v1", pools={"engine": "engine-llama-v1"})
    ]
    load = {"llama": {"engine-llama-v1": PoolMetrics(sampled_at=T0, queue_depth=12)}}
    plan = decide([obj], observed(), load, T0)
    assert all_deployments(written(plan))["engine-llama-v1"] == {"name": "engine-llama-v1", "num_replicas": 3}
    update = update_of(plan, "llama")
    assert update.status is not None and update.status.replicas_per_pool == {"engine-llama-v1": 3}
    assert "ScaledUp" in [e.reason for e in update.events]


def test_the_invalid_spec_warning_is_said_once_per_message():
    def stored_degraded(status: str, reason: str, message: str) -> ModelResourceStatus:
        return ModelResourceStatus.model_validate(
            {
                "conditions": [
                    {
                        "type": "Degraded",
                        "status": status,
                        "reason": reason,
                        "message": message,
                        "lastTransitionTime": "2024-01-01T00:00:00Z",
                    }
                ]
            }
        )

    assert [e.reason for e in invalid_spec_events(None, "bad")] == ["InvalidSpec"]
    assert invalid_spec_events(stored_degraded("True", "InvalidSpec", "bad"), "bad") == []
    assert len(invalid_spec_events(stored_degraded("True", "InvalidSpec", "bad"), "worse")) == 1
    assert len(invalid_spec_events(stored_degraded("True", "CanaryAnalysisFailed", "bad"), "bad")) == 1
    long = "x" * 5000  # the condition keeps 4096 characters: compare with what it kept
    assert invalid_spec_events(stored_degraded("True", "InvalidSpec", long[:4096]), long) == []
