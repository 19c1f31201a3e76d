"""kubectl-expertmesh against FakeKubernetesApi (an in-memory fake of the API) and reconcile_once."""

from __future__ import annotations

from fake_kube import FakeKubernetesApi

from expertmesh_operator import plugin
from expertmesh_operator.crd import ROLLOUT_ANNOTATION
from expertmesh_operator.reconcile_round import OperatorSettings, reconcile_once

T0 = 1_700_000_000.0
SETTINGS = OperatorSettings(namespaces=("ml",))


def spec(version):
    return {
        "source": {"checkpoint": "/ckpt/qwen"},
        "version": version,
        "expertParallel": {"enabled": True, "groups": 2},
    }


def canary_in_progress() -> FakeKubernetesApi:
    fake = FakeKubernetesApi()
    fake.apply_model("qwen", spec("v1"), namespace="ml")
    reconcile_once(fake, None, SETTINGS, T0)
    fake.apply_model("qwen", spec("v2"), namespace="ml")
    reconcile_once(fake, None, SETTINGS, T0 + 1)
    return fake


def run(fake, capsys, *argv):
    code = plugin.main(list(argv), api=fake)
    out, err = capsys.readouterr()
    return code, out, err


def test_status_shows_revisions_traffic_pools_and_conditions(capsys):
    fake = canary_in_progress()
    code, out, _ = run(fake, capsys, "status", "qwen", "-n", "ml")
    assert code == 0
    assert "Model:      ml/qwen" in out
    assert "Phase:      Progressing (canary v2, step 1/3)" in out
    assert "v1" in out and " 90% (stable)" in out and " 10% (canary)" in out
    assert "experts-qwen-v2-g1" in out and "Pools (6 replicas):" in out
    assert [line.split()[0] for line in out.split("Conditions:")[1].strip().splitlines()] == [
        "Ready", "Progressing", "Degraded", "ScalingActive",
    ]  # fmt: skip


def test_promote_sets_the_annotation_the_state_machine_reads(capsys):
    fake = canary_in_progress()
    code, out, _ = run(fake, capsys, "promote", "qwen", "-n", "ml")
    assert code == 0 and "canary v2 to 100%" in out
    assert fake.model("qwen", "ml")["metadata"]["annotations"][ROLLOUT_ANNOTATION] == "promote"
    reconcile_once(fake, None, SETTINGS, T0 + 2)
    code, out, _ = run(fake, capsys, "status", "qwen", "-n", "ml")
    assert "Phase:      Stable" in out and "100% (stable)" in out


def test_abort_without_a_canary_is_refused_clearly(capsys):
    fake = canary_in_progress()
    run(fake, capsys, "abort", "qwen", "-n", "ml")
    reconcile_once(fake, None, SETTINGS, T0 + 2)
    code, _, err = run(fake, capsys, "abort", "qwen", "-n", "ml")
    assert code == 1 and "has no canary in progress (phase: Aborted)" in err
    assert ROLLOUT_ANNOTATION not in fake.model("qwen", "ml")["metadata"]["annotations"]


def test_unknown_model_names_the_namespace(capsys):
    code, _, err = run(FakeKubernetesApi(), capsys, "status", "nope", "-n", "ml")
    assert code == 1 and err.strip() == (
        'error: Model "nope" not found in namespace "ml" (kubectl get models -A lists them)'
    )
