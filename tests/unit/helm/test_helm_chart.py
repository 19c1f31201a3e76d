"""The Helm chart, rendered by a real helm: lint, every built-in object against the Kubernetes
schemas (kubernetes-validate, offline), the RayService's serveConfigV2 parsed back by our own
serve-config model, least-privilege RBAC, and values.schema.json rejecting bad values.

helm comes from `make helm-bin` (.tools/bin/helm) or PATH; without it the module skips with one
line (and fails under CI, where `make test` always installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from ray.serve.schema import ServeDeploySchema

from expertmesh.serve.app import build_apps
from expertmesh.serve_layout import APP_NAME, platform_config, serve_deploy_config
from expertmesh_operator.crd import CRD_NAME
from expertmesh_operator.main import parse_args, settings_from
from expertmesh_operator.reconcile import rayservice_manifest

ROOT = Path(__file__).parents[3]
CHART = ROOT / "helm" / "expertmesh"
VALUES_DIR = ROOT / "tests" / "helm-values"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
RELEASE, NAMESPACE = "expertmesh", "expertmesh"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.26.0", "1.37.0")
# Kinds defined by CRDs (KubeRay, prometheus-operator): no built-in schema; checked by hand below.
CRD_KINDS = {("ray.io/v1", "RayService"), ("monitoring.coreos.com/v1", "PodMonitor")}


def _helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    path = str(local) if os.access(local, os.X_OK) else shutil.which("helm")
    if path is None:
        message = "helm not found at .tools/bin/helm or on PATH: run `make helm-bin`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)
    return path


HELM = _helm()


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, check=False)


def render(*values: Path | str, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
    for v in values:
        args += ["--values", str(v)]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


_rendered: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=["default", *(p.stem for p in VALUES_FILES)])
def case(request) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(name, the values file's content, the rendered objects), rendered once per values file."""
    name = request.param
    path = VALUES_DIR / f"{name}.yaml"
    values = yaml.safe_load(path.read_text()) if name != "default" else {}
    if name not in _rendered:
        _rendered[name] = render(path) if name != "default" else render()
    return name, values, _rendered[name]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


def kube_validate(obj: dict[str, Any]) -> None:
    for version in KUBE_VERSIONS:
        problem = None
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problem = f"invalid for Kubernetes {version} at {where or '(top)'}: {exc.message}"
        except SchemaNotFoundError as exc:
            problem = exc.message
        if problem is not None:
            pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} {problem}")


# ---- lint and schema-valid output ---------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda v: "default" if v is None else v.stem)
def test_helm_lint_is_clean(values):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values)]
    proc = helm(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_every_builtin_object_validates_against_the_kubernetes_schemas(case):
    _, _, docs = case
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    assert {d["kind"] for d in builtin} >= {"CustomResourceDefinition", "Deployment"}
    for obj in builtin:
        assert obj["metadata"].get("namespace") in (NAMESPACE, None) or obj["kind"] in ("Role", "RoleBinding")
        kube_validate(obj)


def test_pod_templates_and_serve_service_inside_the_rayservice_validate_too(case):
    # RayService is a CRD, but its pod templates and Service are core/v1 shapes: check them as such.
    _, _, docs = case
    rs = only(docs, "RayService")
    for group, spec in pod_templates(rs).items():
        kube_validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": group},
                "template": spec["template"],
            }
        )
    serve_service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "serve"}}
    kube_validate({**serve_service, **rs["spec"]["serveService"]})


def test_the_crd_is_installed_from_crds():
    committed = yaml.safe_load((CHART / "crds" / f"{CRD_NAME}.yaml").read_text())
    assert only(render(), "CustomResourceDefinition") == committed


# ---- the RayService ----------------------------------------------------------------------------


def test_serve_config_v2_is_the_empty_platform_our_serve_config_describes(case):
    _, _, docs = case
    rs = only(docs, "RayService")
    text = rs["spec"]["serveConfigV2"]
    assert isinstance(text, str), "KubeRay wants serveConfigV2 as a YAML string"
    parsed = yaml.safe_load(text)
    # Ray Serve accepts it as a deploy config ...
    ServeDeploySchema.model_validate(parsed)
    # ... its one application is the Router's, whose user_config our ServeConfig parses back ...
    (app,) = parsed["applications"]
    config = platform_config(parsed, "the chart's serveConfigV2")
    assert config.models == [] and app["name"] == APP_NAME
    assert list(build_apps(config)) == [APP_NAME]  # an empty platform builds: the Router alone
    # ... and it is byte for byte what the operator writes for that config, so it starts from the same.
    expected = rayservice_manifest(rs["metadata"]["name"], NAMESPACE, serve_deploy_config(config), {})
    assert text == expected["spec"]["serveConfigV2"]


def test_rayservice_runs_the_autoscaled_cluster_the_values_ask_for(case):
    _, values, docs = case
    rs_values = values.get("rayService", {})
    rs = only(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == rs_values.get("rayVersion", "2.60.0")
    expected_name = rs_values.get("name") or values.get("fullnameOverride") or RELEASE
    assert rs["metadata"]["name"] == expected_name

    groups = pod_templates(rs)
    want_groups = [g["name"] for g in rs_values.get("workerGroups", [{"name": "cpu"}])]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == want_groups
    image = rs_values.get("image", {})
    want_image = (
        f"{image.get('repository', 'ghcr.io/expertmesh/expertmesh-runtime')}:{image.get('tag', '0.1.0')}"
    )
    claims = rs_values.get("modelVolumeClaims", [])
    for group, spec in groups.items():
        params = spec["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{group}: rayStartParams must be strings"
        assert params["metrics-export-port"] == "8080"
        (container,) = spec["template"]["spec"]["containers"]
        assert container["image"] == want_image
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert {"serve": 8000, "serve-grpc": 9000, "metrics": 8080}.items() <= ports.items()
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert sorted(mounts) == sorted(f"/mnt/models/{c}" for c in claims)
        assert all(m["readOnly"] for m in mounts.values())
        volumes = spec["template"]["spec"].get("volumes", [])
        assert sorted(v["persistentVolumeClaim"]["claimName"] for v in volumes) == sorted(claims)
    assert groups["head"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group, spec in groups.items():
        if group == "head":
            continue
        assert spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"]

    ports = {p["name"]: p for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert ports["serve"]["port"] == 8000
    assert (ports["serve-grpc"]["port"], ports["serve-grpc"]["appProtocol"]) == (9000, "kubernetes.io/h2c")


def test_custom_resources_and_scheduling_reach_the_worker_pods():
    docs = render(VALUES_DIR / "worker-groups.yaml")
    groups = pod_templates(only(docs, "RayService"))
    gpu = groups["gpu-a100"]
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod["affinity"]
    assert gpu["rayStartParams"]["resources"] == '"{\\"expert_pool\\": 8}"'
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (2, 1, 8)
    assert groups["cpu"]["replicas"] == 0  # replicas defaults to minReplicas
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    assert groups["head"]["serviceType"] == "LoadBalancer"


# ---- operator, RBAC, monitoring ---------------------------------------------------------------


def _watched(values: dict[str, Any]) -> list[str] | None:
    op = values.get("operator", {})
    return None if op.get("clusterWide") else (op.get("watchNamespaces") or [NAMESPACE])


def test_operator_deployment_runs_expertmesh_operator_with_the_release_settings(case):
    _, values, docs = case
    dep = only(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["expertmesh-operator"]
    args = container["args"]
    rs_name = only(docs, "RayService")["metadata"]["name"]
    assert f"--rayservice={rs_name}" in args
    assert (
        f"--prometheus-url={values.get('prometheus', {}).get('url', 'http://prometheus-operated.monitoring.svc:9090')}"
        in args
    )
    assert f"--interval={values.get('operator', {}).get('interval', 30)}" in args
    watched = _watched(values)
    if watched is None:
        assert "--all-namespaces" in args and not any(a.startswith("--namespace=") for a in args)
    else:
        assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={ns}" for ns in watched]
    extra = values.get("operator", {}).get("extraArgs", [])
    assert args[len(args) - len(extra) :] == extra
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # the ServiceAccount it runs as is the one the chart makes (or names)
    sa_name = pod["serviceAccountName"]
    sa = [d for d in docs if d["kind"] == "ServiceAccount"]
    if values.get("serviceAccount", {}).get("create", True):
        assert [s["metadata"]["name"] for s in sa] == [sa_name]
    else:
        assert sa == [] and sa_name == values["serviceAccount"]["name"]


def test_operator_args_parse_into_the_settings_the_release_means(case, tmp_path, monkeypatch):
    # the chart's flags, through the operator's own argument parser
    _, values, docs = case
    container = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    configmap = only(docs, "ConfigMap")
    cluster_file = tmp_path / "ray-cluster-config.yaml"
    cluster_file.write_text(configmap["data"]["ray-cluster-config.yaml"])
    args = [
        f"--ray-cluster-config={cluster_file}" if a.startswith("--ray-cluster-config=") else a
        for a in container["args"]
    ]
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    settings = settings_from(parse_args(args))
    rs = only(docs, "RayService")
    assert settings.rayservice_name == rs["metadata"]["name"]
    assert settings.rayservice_namespace == NAMESPACE
    watched = _watched(values)
    assert settings.namespaces == (None if watched is None else tuple(watched))
    assert settings.interval_s == values.get("operator", {}).get("interval", 30)
    # should the operator ever create the RayService, it makes the same Ray cluster the chart does
    assert settings.ray_cluster_config == rs["spec"]["rayClusterConfig"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(container_path(container["args"])).parent) in mounts


def container_path(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("--ray-cluster-config="))


MODEL_RULES = {
    ("serving.expertmesh.io", "models"): {"get", "list", "watch", "patch"},
    ("serving.expertmesh.io", "models/status"): {"patch"},
    ("", "events"): {"create"},
}
# What operators/expertmesh_operator/kube.py calls (get/create/patch), and kopf's events.
RAYSERVICE_RULES = {
    ("ray.io", "rayservices"): {"get", "create", "patch"},
    ("", "events"): {"create"},
}


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_grants_exactly_the_verbs_the_operator_uses(case):
    _, values, docs = case
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    if not values.get("rbac", {}).get("create", True):
        assert roles == {} and bindings == []
        return
    watched = _watched(values)
    granted: dict[str | None, dict[tuple[str, str], set[str]]] = {}
    sa_name = only(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
        ref = binding["roleRef"]
        role_ns = None if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        role = roles[(ref["kind"], role_ns, ref["name"])]
        scope = granted.setdefault(role_ns, {})
        for key, verbs in _rules(role).items():
            scope.setdefault(key, set()).update(verbs)
    assert len(bindings) == len(roles), "every Role is bound, and nothing else"
    if watched is None:
        assert granted[None] == MODEL_RULES
        assert granted[NAMESPACE] == RAYSERVICE_RULES
        assert set(granted) == {None, NAMESPACE}
    else:
        expected = {ns: dict(MODEL_RULES) for ns in watched}
        for key, verbs in RAYSERVICE_RULES.items():
            expected.setdefault(NAMESPACE, {}).setdefault(key, set())
            expected[NAMESPACE][key] = expected[NAMESPACE][key] | verbs
        assert granted == expected


def test_pod_monitor_scrapes_the_metrics_port_of_this_releases_ray_pods(case):
    _, values, docs = case
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    pm_values = values.get("monitoring", {}).get("podMonitor", {})
    if not pm_values.get("enabled"):
        assert monitors == []
        return
    (pm,) = monitors
    assert pm_values.get("labels", {}).items() <= pm["metadata"]["labels"].items()
    selector = pm["spec"]["selector"]["matchLabels"]
    for group, spec in pod_templates(only(docs, "RayService")).items():
        assert selector.items() <= spec["template"]["metadata"]["labels"].items(), group
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == pm_values.get("interval", "15s")
    assert endpoint["metricRelabelings"][0]["regex"] == "ray_(expertmesh_.*)"
    # the operator deployment's pods are not Ray pods: not scraped
    operator_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= operator_labels.items()


def test_notes_tell_how_to_apply_a_model_and_use_the_plugin():
    proc = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n expertmesh apply -f deployments/models/" in notes
    assert "kubectl -n expertmesh get models" in notes
    for verb in ("status", "promote", "abort"):
        assert f"kubectl expertmesh {verb} MODEL" in notes


# ---- bad values fail with a message that names the problem ---------------------------------------

CPU_GROUP = {"name": "cpu", "minReplicas": 1, "maxReplicas": 4}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"intervall": 5}}, "intervall"),
        ({"rayService": {"workerGroups": [{**CPU_GROUP, "maxReplicaz": 3}]}}, "maxReplicaz"),
        ({"operator": {"interval": 0}}, "minimum"),
        ({"prometheus": {"url": "prometheus:9090"}}, "/prometheus/url"),
        ({"rayService": {"autoscaler": {"upscalingMode": "Fast"}}}, "upscalingMode"),
        ({"rayService": {"head": {"rayStartParams": {"num-cpus": 0}}}}, "num-cpus"),
        (
            {"rayService": {"workerGroups": [{**CPU_GROUP, "resources": {"limits": {"memory": "lots"}}}]}},
            "memory",
        ),
        ({"rayService": {"modelVolumeClaims": ["Weights"]}}, "modelVolumeClaims"),
        ({"rayService": {"workerGroups": []}}, "workerGroups"),
        (
            {"rayService": {"workerGroups": [{**CPU_GROUP, "minReplicas": 5}]}},
            "rayService.workerGroups[0] (cpu): minReplicas 5 is above maxReplicas 4",
        ),
        (
            {"rayService": {"workerGroups": [{**CPU_GROUP, "replicas": 9}]}},
            "rayService.workerGroups[0] (cpu): replicas 9 is outside [minReplicas 1, maxReplicas 4]",
        ),
        (
            {"rayService": {"workerGroups": [CPU_GROUP, CPU_GROUP]}},
            'rayService.workerGroups[1]: the name "cpu" is used twice',
        ),
        (
            {"operator": {"clusterWide": True, "watchNamespaces": ["team-a"]}},
            "operator.watchNamespaces must be empty when operator.clusterWide is true",
        ),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name: name an existing ServiceAccount"),
    ],
    ids=lambda v: v.split(":")[0][:40] if isinstance(v, str) else None,
)
def test_bad_values_fail_with_a_clear_message(tmp_path, values, message):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", str(path))
    assert proc.returncode != 0, f"helm accepted {values}"
    assert message in proc.stderr, proc.stderr
