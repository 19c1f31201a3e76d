"""reconcile_once against FakeKubernetesApi (an in-memory fake of the API, not a cluster).

Each test plays the user with `fake.apply_model/annotate_model/delete_model` and the operator
with `loop(...)`, then reads back what a real API server would hold.
"""

from __future__ import annotations

import yaml
from fake_kube import FakeKubernetesApi
from ray.serve.schema import ServeDeploySchema

from expertmesh.config import ServeConfig
from expertmesh.serve_layout import all_deployments, platform_config
from expertmesh_operator.crd import FINALIZER, ROLLOUT_ANNOTATION, ModelResourceStatus
from expertmesh_operator.kube import KubeError
from expertmesh_operator.pool_autoscale import PoolMetrics
from expertmesh_operator.reconcile_round import OperatorSettings, reconcile_once
from expertmesh_operator.rollout import AnalysisResult

T0 = 1_700_000_000.0
SETTINGS = OperatorSettings(namespaces=("default", "team-b"))
RS = ("default", "expertmesh")


def spec(name="pangu", version="v1", **extra):
    base = {
        "source": {"checkpoint": f"/ckpt/{name}"},
        "version": version,
        "rollout": {"canary": {"steps": [10, 50, 100], "pauseSeconds": 60}},
    }
    return base | extra


class FakeMetrics:
    """A FAKE Prometheus (the MetricsSource protocol): answers what the test sets."""

    def __init__(self):
        self.load: dict[str, dict[str, PoolMetrics]] = {}  # revision -> pool label -> metrics
        self.analysis: AnalysisResult | None = None
        self.fail = False
        self.asked: list[tuple] = []

    def pool_metrics(self, model, revision, pools, now):
        self.asked.append(("pools", model, revision, tuple(pools)))
        if self.fail:
            raise ConnectionError("prometheus is down")
        return {p: m for p, m in self.load.get(revision, {}).items() if p in pools}

    def canary_analysis(self, model, stable, canary, window_start, now):
        self.asked.append(("analysis", model, stable, canary, window_start))
        return self.analysis


def loop(fake, now=T0, prometheus=None, settings=SETTINGS):
    return reconcile_once(fake, prometheus, settings, now)


def serve_config(fake) -> dict:
    return yaml.safe_load(fake.rayservices[RS]["spec"]["serveConfigV2"])


def app_config(fake) -> ServeConfig:
    raw = serve_config(fake)
    ServeDeploySchema.model_validate(raw)  # Ray Serve accepts what we wrote
    return platform_config(raw)


def traffic(fake) -> dict:
    return serve_config(fake)["applications"][0]["deployments"][0]["user_config"]["traffic"]


def status(fake, name, namespace="default") -> ModelResourceStatus:
    return ModelResourceStatus.model_validate(fake.model(name, namespace)["status"])


def reasons(fake, name=None) -> list[str]:
    return [e.reason for e in fake.events if name is None or e.name == name]


def test_models_become_one_rayservice_and_statuses():
    fake = FakeKubernetesApi()
    fake.apply_model("pangu", spec(expertParallel={"enabled": True, "groups": 4, "replicasPerGroup": 2}))
    fake.apply_model("llama", spec("llama", engineReplicas=2), namespace="team-b")
    fake.apply_model("elsewhere", spec("elsewhere"), namespace="not-watched")
    report = loop(fake)

    assert not report.errors
    rs = fake.rayservices[RS]
    assert rs["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "expertmesh-operator"
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    config = app_config(fake)
    assert [m.name for m in config.models] == ["llama", "pangu"]
    pangu = config.models[1].revisions[0]
    assert (pangu.source, pangu.expert_parallel.groups, pangu.expert_parallel.replicas_per_group) == (
        "/ckpt/pangu", 4, 2,
    )  # fmt: skip
    assert traffic(fake) == {"llama": {"v1": 100}, "pangu": {"v1": 100}}

    st = status(fake, "pangu")
    assert (
        st.observed_generation == 1 and st.ready == "True" and st.revision == "v1" and st.traffic == "v1=100"
    )
    assert st.replicas_per_pool == {"engine-pangu-v1": 1} | {f"experts-pangu-v1-g{g}": 2 for g in range(4)}
    assert st.endpoint == "http://expertmesh-serve-svc.default.svc:8000"
    assert {c.type: (c.status, c.reason) for c in st.conditions} == {
        "Ready": ("True", "Serving"),
        "Progressing": ("False", "Settled"),
        "Degraded": ("False", "AsExpected"),
        "ScalingActive": ("False", "NoPrometheus"),
    }
    assert status(fake, "llama", "team-b").replicas_per_pool == {"engine-llama-v1": 2}
    assert fake.model("pangu")["metadata"]["finalizers"] == [FINALIZER]
    assert "status" not in fake.model("elsewhere", "not-watched")
    assert sorted(reasons(fake, "pangu")) == ["AutoscalingNoPrometheus", "RevisionCreated"]
    assert {e.namespace for e in fake.events if e.name == "llama"} == {"team-b"}
    assert all(e.uid for e in fake.events)  # so `kubectl describe model` finds them


def test_second_round_without_change_writes_nothing():
    fake = FakeKubernetesApi()
    fake.apply_model("pangu", spec(expertParallel={"enabled": True, "groups": 4}))
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    writes, versions = len(fake.writes), {k: o["metadata"]["resourceVersion"] for k, o in fake.models.items()}

    report = loop(fake, now=T0 + 30)
    assert report.writes == [] and len(fake.writes) == writes
    assert {k: o["metadata"]["resourceVersion"] for k, o in fake.models.items()} == versions


def test_generation_bump_without_a_new_revision_updates_observed_generation_only():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    before = serve_config(fake)
    fake.apply_model("llama", spec("llama", autoscaling={"queueDepthPerReplica": 9}))
    report = loop(fake, now=T0 + 5)
    assert [w.split()[0] for w in report.writes] == ["status"]
    assert status(fake, "llama").observed_generation == 2
    assert serve_config(fake) == before


def test_invalid_spec_is_degraded_and_the_previous_revision_keeps_serving():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    before = serve_config(fake)

    fake.apply_model("llama", spec("llama", version="v2", minEngineReplicas=5, maxEngineReplicas=2))
    loop(fake, now=T0 + 10)
    st = status(fake, "llama")
    degraded = st.condition("Degraded")
    assert degraded.status == "True" and degraded.reason == "InvalidSpec"
    assert "minEngineReplicas (5) is above maxEngineReplicas (2)" in degraded.message
    assert st.ready == "True" and st.traffic == "v1=100" and st.observed_generation == 2
    assert serve_config(fake) == before  # nothing new deployed, v1 untouched
    assert reasons(fake).count("InvalidSpec") == 1
    assert loop(fake, now=T0 + 20).writes == []  # said once, not every round

    fake.apply_model("llama", spec("llama", version="v2"))  # fixed: the canary starts
    loop(fake, now=T0 + 30)
    assert status(fake, "llama").condition("Degraded").status == "False"
    assert traffic(fake) == {"llama": {"v1": 90, "v2": 10}}


def test_invalid_new_model_is_not_deployed_and_does_not_disturb_others():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    fake.apply_model("bad", spec("bad", rollout={"canary": {"steps": [50, 20]}}))
    loop(fake)
    assert traffic(fake) == {"llama": {"v1": 100}}
    st = status(fake, "bad")
    assert st.ready == "False" and st.condition("Degraded").reason == "InvalidSpec"
    assert "must strictly increase" in st.condition("Degraded").message


def test_unreadable_spec_freezes_the_stable_revision():
    # the API server's schema keeps this out in a cluster; the operator must not fall over anyway
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    before = serve_config(fake)
    fake.apply_model("llama", spec("llama", engineReplicas="many"))
    report = loop(fake, now=T0 + 10)
    assert not report.errors
    assert serve_config(fake) == before
    degraded = status(fake, "llama").condition("Degraded")
    assert degraded.reason == "InvalidSpec" and "spec cannot be read" in degraded.message
    assert degraded.message.startswith("the spec cannot be read: engineReplicas")
    assert loop(fake, now=T0 + 20).writes == []


def test_deletion_removes_only_that_models_deployments_then_releases_it():
    fake = FakeKubernetesApi()
    fake.apply_model("pangu", spec(expertParallel={"enabled": True, "groups": 2}))
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    llama_before = next(m for m in app_config(fake).models if m.name == "llama")

    fake.delete_model("pangu")
    assert fake.model("pangu")["metadata"]["deletionTimestamp"]  # held by our finalizer
    loop(fake, now=T0 + 5)
    config = app_config(fake)
    assert [m.name for m in config.models] == ["llama"] and config.models[0] == llama_before
    assert traffic(fake) == {"llama": {"v1": 100}}
    assert [a["name"] for a in serve_config(fake)["applications"]] == ["expertmesh", "llama-v1"]
    assert fake.model("pangu") is None  # finalizer released, deletion done
    assert reasons(fake, "pangu")[-1] == "Removed"

    fake.delete_model("llama")
    loop(fake, now=T0 + 10)
    assert app_config(fake).models == [] and traffic(fake) == {}  # the Router alone answers model-not-found
    assert fake.models == {}


def test_a_new_revision_runs_a_canary_and_analysis_moves_it():
    fake, prom = FakeKubernetesApi(), FakeMetrics()
    fake.apply_model("llama", spec("llama"))
    loop(fake, prometheus=prom)
    fake.apply_model("llama", spec("llama", version="v2"))
    loop(fake, now=T0 + 100, prometheus=prom)
    assert traffic(fake) == {"llama": {"v1": 90, "v2": 10}}
    st = status(fake, "llama")
    assert st.condition("Progressing").status == "True" and st.rollout.phase == "Progressing"
    assert {"engine-llama-v1", "engine-llama-v2"} <= set(st.replicas_per_pool)
    assert "CanaryStarted" in reasons(fake)

    # analysis over the step's window passes after the pause: 10% -> 50%
    prom.analysis = AnalysisResult(
        window_start=T0 + 100, canary_requests=50, canary_error_ratio=0.0, stable_error_ratio=0.0,
        canary_p95_seconds=0.02, stable_p95_seconds=0.02,
    )  # fmt: skip
    loop(fake, now=T0 + 130, prometheus=prom)
    assert traffic(fake) == {"llama": {"v1": 90, "v2": 10}}  # still inside the pause
    loop(fake, now=T0 + 170, prometheus=prom)
    assert traffic(fake) == {"llama": {"v1": 50, "v2": 50}}
    assert ("analysis", "llama", "v1", "v2", T0 + 100) in prom.asked

    # a failing analysis of the next step rolls back
    prom.analysis = prom.analysis.model_copy(update={"window_start": T0 + 170, "canary_error_ratio": 0.5})
    loop(fake, now=T0 + 240, prometheus=prom)
    assert traffic(fake) == {"llama": {"v1": 100}}
    st = status(fake, "llama")
    assert st.rollout.phase == "RolledBack" and st.condition("Degraded").reason == "CanaryAnalysisFailed"
    assert reasons(fake).count("RolledBack") == 1


def test_promote_annotation_promotes_and_is_cleared():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    fake.apply_model("llama", spec("llama", version="v2"))
    loop(fake, now=T0 + 1)
    fake.annotate_model("llama", ROLLOUT_ANNOTATION, "promote")
    loop(fake, now=T0 + 2)
    assert traffic(fake) == {"llama": {"v2": 100}}
    assert status(fake, "llama").rollout.phase == "Stable" and status(fake, "llama").revision == "v2"
    assert ROLLOUT_ANNOTATION not in fake.model("llama")["metadata"].get("annotations", {})
    assert reasons(fake)[-1] == "Promoted"
    assert loop(fake, now=T0 + 3).writes == []

    # the cleared annotation cannot promote the next canary behind the user's back
    fake.apply_model("llama", spec("llama", version="v3"))
    loop(fake, now=T0 + 4)
    assert traffic(fake) == {"llama": {"v2": 90, "v3": 10}}


def test_abort_annotation_returns_traffic_to_stable():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    fake.apply_model("llama", spec("llama", version="v2"))
    loop(fake, now=T0 + 1)
    fake.annotate_model("llama", ROLLOUT_ANNOTATION, "abort")
    loop(fake, now=T0 + 2)
    assert traffic(fake) == {"llama": {"v1": 100}}
    st = status(fake, "llama")
    assert st.rollout.phase == "Aborted" and st.condition("Degraded").reason == "RolloutAborted"
    assert [d for d in st.replicas_per_pool if "v2" in d] == []
    assert ROLLOUT_ANNOTATION not in fake.model("llama")["metadata"].get("annotations", {})
    assert "Aborted" in reasons(fake)


def test_rollout_command_without_a_canary_or_unknown_is_refused_and_cleared():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    fake.annotate_model("llama", ROLLOUT_ANNOTATION, "promote")
    loop(fake, now=T0 + 1)
    assert fake.events[-1].reason == "RolloutCommandIgnored" and "no canary" in fake.events[-1].message
    fake.annotate_model("llama", ROLLOUT_ANNOTATION, "yolo")
    loop(fake, now=T0 + 2)
    assert fake.events[-1].type == "Warning" and "unknown rollout command 'yolo'" in fake.events[-1].message
    assert ROLLOUT_ANNOTATION not in fake.model("llama")["metadata"]["annotations"]


def test_operator_restart_mid_rollout_resumes_without_duplicates():
    fake, prom = FakeKubernetesApi(), FakeMetrics()
    fake.apply_model("llama", spec("llama"))
    loop(fake, prometheus=prom)
    fake.apply_model("llama", spec("llama", version="v2"))
    loop(fake, now=T0 + 100, prometheus=prom)
    events_before, rs_before = list(fake.events), fake.get_rayservice(*RS)

    # a new operator process: nothing in memory, same API state, a fresh metrics client
    restarted = FakeMetrics()
    assert loop(fake, now=T0 + 110, prometheus=restarted).writes == []
    assert fake.events == events_before and fake.get_rayservice(*RS) == rs_before
    assert len(fake.rayservices) == 1
    restarted.analysis = AnalysisResult(
        window_start=T0 + 100, canary_requests=5, canary_error_ratio=0.0, stable_error_ratio=0.0,
        canary_p95_seconds=None, stable_p95_seconds=None,
    )  # fmt: skip
    loop(fake, now=T0 + 170, prometheus=restarted)
    assert traffic(fake) == {"llama": {"v1": 50, "v2": 50}}  # step 2, from the stored step 1
    assert reasons(fake).count("CanaryStarted") == 1 and reasons(fake).count("RevisionCreated") == 1


def test_existing_rayservice_keeps_its_cluster_config():
    fake = FakeKubernetesApi()
    helm_made = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "expertmesh", "namespace": "default"},
        "spec": {"rayClusterConfig": {"headGroupSpec": {"from": "helm"}}},
    }
    fake.create_rayservice(helm_made)
    fake.writes.clear()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    assert fake.writes[0:2] == [("finalizers", "default/llama"), ("patch rayservice", "default/expertmesh")]
    assert fake.rayservices[RS]["spec"]["rayClusterConfig"] == {"headGroupSpec": {"from": "helm"}}
    assert traffic(fake) == {"llama": {"v1": 100}}


def test_same_name_in_two_namespaces_deploys_once():
    fake = FakeKubernetesApi()
    fake.apply_model("llama", spec("llama"))
    fake.apply_model("llama", spec("llama", engineReplicas=3), namespace="team-b")
    loop(fake)
    assert [m.name for m in app_config(fake).models] == ["llama"]
    assert app_config(fake).models[0].revisions[0].engine_replicas == 1  # default/ wins
    blocked = status(fake, "llama", "team-b").condition("Degraded")
    assert blocked.status == "True" and "already deployed from namespace default" in blocked.message


def test_autoscaling_scales_from_prometheus_and_holds_on_outage():
    fake, prom = FakeKubernetesApi(), FakeMetrics()
    fake.apply_model(
        "llama", spec("llama", autoscaling={"queueDepthPerReplica": 4, "scaleDownStabilizationSeconds": 60})
    )
    busy = PoolMetrics(sampled_at=T0, queue_depth=12)
    prom.load = {"v1": {"engine": busy}}
    loop(fake, prometheus=prom)
    assert ("pools", "llama", "v1", ("engine",)) in prom.asked
    st = status(fake, "llama")
    assert st.replicas_per_pool == {"engine-llama-v1": 3}
    assert all_deployments(serve_config(fake))["engine-llama-v1"] == {
        "name": "engine-llama-v1",
        "num_replicas": 3,
    }
    assert st.condition("ScalingActive").status == "True"
    assert "ScaledUp" in reasons(fake) and st.autoscaling.history["engine-llama-v1"][-1].replicas == 3

    # Prometheus down: hold at 3, say so in the condition and one event, never scale down
    prom.fail = True
    loop(fake, now=T0 + 30, prometheus=prom)
    st = status(fake, "llama")
    assert st.replicas_per_pool == {"engine-llama-v1": 3}
    assert st.condition("ScalingActive").reason == "MetricsUnavailable"
    assert st.autoscaling.held_pools == ["engine-llama-v1"]
    assert fake.events[-1].reason == "AutoscalingHeld" and "prometheus is down" in fake.events[-1].message
    assert loop(fake, now=T0 + 31, prometheus=prom).writes == []

    # back, and idle: down only after the 60 s window; history from status survives a restart
    prom.fail = False
    prom.load = {"v1": {"engine": PoolMetrics(sampled_at=T0 + 40, queue_depth=0.5)}}
    loop(fake, now=T0 + 40, prometheus=prom)
    assert status(fake, "llama").replicas_per_pool == {"engine-llama-v1": 3}
    prom.load = {"v1": {"engine": PoolMetrics(sampled_at=T0 + 100, queue_depth=0.5)}}
    loop(fake, now=T0 + 100, prometheus=prom)
    assert status(fake, "llama").replicas_per_pool == {"engine-llama-v1": 1}
    assert "ScaledDown" in reasons(fake)


def test_moge_expert_pools_scale_together(pangu_tiny):
    fake, prom = FakeKubernetesApi(), FakeMetrics()
    fake.apply_model(
        "pangu",
        {
            "source": {"checkpoint": str(pangu_tiny)},
            "expertParallel": {"enabled": True, "replicasPerGroup": 1, "maxReplicasPerGroup": 4},
        },
    )
    loop(fake)  # no Prometheus yet: learn the pools
    pools = [p for p in status(fake, "pangu").replicas_per_pool if p.startswith("experts-")]
    assert len(pools) >= 2
    # one hot group makes every MoGE group scale (their load is equal by construction)
    prom.load = {
        "v1": {f"experts-g{g}": PoolMetrics(sampled_at=T0, tokens_per_second=1.0) for g in range(len(pools))}
    }
    prom.load["v1"]["experts-g0"] = PoolMetrics(sampled_at=T0, queue_depth=8)
    prom.load["v1"]["engine"] = PoolMetrics(sampled_at=T0, queue_depth=1)
    loop(fake, now=T0 + 1, prometheus=prom)
    replicas = status(fake, "pangu").replicas_per_pool
    assert {replicas[p] for p in pools} == {2} and replicas["engine-pangu-v1"] == 1
    scaled = [e for e in fake.events if e.reason == "ScaledUp"]
    assert len(scaled) == 1 and "MoGE groups, together" in scaled[0].message


class FlakyKube(FakeKubernetesApi):
    """The fake API, with the writes named in `failing` answering a KubeError (Model name, call)."""

    def __init__(self):
        super().__init__()
        self.failing: set[tuple[str, str]] = set()

    def _fail(self, name, call):
        if (name, call) in self.failing:
            raise KubeError(f"{call} of {name} failed", 500)

    def set_model_finalizers(self, namespace, name, finalizers, resource_version):
        self._fail(name, "finalizers")
        super().set_model_finalizers(namespace, name, finalizers, resource_version)

    def patch_model_status(self, namespace, name, status):
        self._fail(name, "status")
        super().patch_model_status(namespace, name, status)

    def post_event(self, event):
        self._fail(event.name, event.reason)
        super().post_event(event)


def test_a_model_whose_finalizer_cannot_be_added_waits_for_the_next_round():
    fake = FlakyKube()
    fake.apply_model("llama", spec("llama"))
    fake.apply_model("pangu", spec())
    fake.failing = {("llama", "finalizers")}
    report = loop(fake)
    assert report.errors == ["finalizers of llama failed"]
    assert [m.name for m in app_config(fake).models] == ["pangu"]  # not deployed without it
    assert "status" not in fake.model("llama") and reasons(fake, "llama") == []

    fake.failing = set()
    loop(fake, now=T0 + 1)
    assert [m.name for m in app_config(fake).models] == ["llama", "pangu"]
    assert fake.model("llama")["metadata"]["finalizers"] == [FINALIZER]


def test_a_failed_status_write_holds_that_models_events_and_annotation():
    fake = FlakyKube()
    fake.apply_model("llama", spec("llama"), annotations={ROLLOUT_ANNOTATION: "yolo"})
    fake.apply_model("pangu", spec())
    fake.failing = {("llama", "status")}
    report = loop(fake)
    assert report.errors == ["status of llama failed"]
    assert reasons(fake, "llama") == [] and "status" not in fake.model("llama")
    assert fake.model("llama")["metadata"]["annotations"] == {ROLLOUT_ANNOTATION: "yolo"}
    assert status(fake, "pangu").ready == "True" and "RevisionCreated" in reasons(fake, "pangu")

    fake.failing = set()
    loop(fake, now=T0 + 1)  # decided again, said then
    assert "RevisionCreated" in reasons(fake, "llama") and "RolloutCommandIgnored" in reasons(fake, "llama")
    assert ROLLOUT_ANNOTATION not in fake.model("llama")["metadata"]["annotations"]


def test_a_failed_event_is_recorded_and_the_round_goes_on():
    fake = FlakyKube()
    fake.apply_model("llama", spec("llama"))
    fake.apply_model("pangu", spec())
    fake.failing = {("llama", "RevisionCreated")}
    report = loop(fake)
    assert report.errors == ["RevisionCreated of llama failed"]
    assert status(fake, "llama").ready == "True" and reasons(fake, "llama") == ["AutoscalingNoPrometheus"]
    assert sorted(reasons(fake, "pangu")) == ["AutoscalingNoPrometheus", "RevisionCreated"]
    assert all(e.reason != "RevisionCreated" or e.name != "llama" for e in report.events)


def test_a_failed_release_keeps_the_model_and_says_nothing():
    fake = FlakyKube()
    fake.apply_model("llama", spec("llama"))
    loop(fake)
    fake.delete_model("llama")
    fake.failing = {("llama", "finalizers")}
    report = loop(fake, now=T0 + 1)
    assert report.errors == ["finalizers of llama failed"]
    assert app_config(fake).models == [] and fake.model("llama") is not None
    assert "Removed" not in reasons(fake, "llama")
    fake.failing = set()
    loop(fake, now=T0 + 2)
    assert fake.model("llama") is None and reasons(fake, "llama")[-1] == "Removed"
