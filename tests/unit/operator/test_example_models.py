"""The example Models in deployments/models/: valid for the committed CRD's schema (what the API
server checks), for the pydantic spec (what the operator parses) and for the semantic checks, and
each deploys what its comment promises once the operator folds it into the serve config."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from expertmesh.serve_layout import platform_config
from expertmesh_operator.crd import CRD_NAME, GROUP, KIND, VERSION, ModelResource
from expertmesh_operator.reconcile import ObservedState, reconcile
from expertmesh_operator.spec_checks import spec_problems

ROOT = Path(__file__).parents[3]
EXAMPLES = ROOT / "deployments" / "models"
CRD = yaml.safe_load((ROOT / "helm" / "expertmesh" / "crds" / f"{CRD_NAME}.yaml").read_text())
EXPECTED = {  # file -> (served name, expert pools per revision)
    "pangu-pro-moe.yaml": ("pangu-pro-moe", 8),
    "qwen3-moe.yaml": ("qwen3-moe", 8),
    "deepseek-v3.yaml": ("deepseek-v3", 8),
    "llama.yaml": ("llama-chat", 0),
}


def crd_validator() -> jsonschema.Validator:
    (version,) = CRD["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def test_every_example_is_listed_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_is_valid_for_the_crd_the_spec_model_and_the_semantic_checks(name):
    obj = load(name)
    assert (obj["apiVersion"], obj["kind"]) == (f"{GROUP}/{VERSION}", KIND)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator().iter_errors(obj)]
    assert errors == []
    model = ModelResource.from_object(obj)
    assert spec_problems(model.spec) == []


@pytest.mark.parametrize(
    ("name", "path", "bad"),
    [
        ("pangu-pro-moe.yaml", ("expertParallel", "groups"), 0),
        ("qwen3-moe.yaml", ("limits", "maxBatchTokens"), "lots"),
        ("llama.yaml", ("resources", "engine", "requests", "memory"), "12 GB"),
        ("llama.yaml", ("source",), {"checkpoint": "/w", "pvc": {"claimName": "w"}}),
    ],
)
def test_a_broken_example_is_refused_by_both_validators(name, path, bad):
    obj = copy.deepcopy(load(name))
    node = obj["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    assert list(crd_validator().iter_errors(obj)), f"the CRD schema accepted {path}={bad!r}"
    with pytest.raises(ValueError):
        ModelResource.from_object(obj)


def test_the_operator_serves_all_three_examples_side_by_side():
    models = [ModelResource.from_object(load(name)) for name in EXPECTED]
    result = reconcile(models, ObservedState(), {}, now=1_000.0)
    config = platform_config(result.serve_config_v2)
    by_name = {m.name: m for m in config.models}
    for file, (served, pools) in EXPECTED.items():
        model = by_name[served]
        (revision,) = model.revisions
        assert (
            revision.source == f"/mnt/models/expertmesh-weights/{load(file)['spec']['source']['pvc']['path']}"
        )
        status = result.statuses[load(file)["metadata"]["name"]]
        assert status.ready == "True", status.conditions
        experts = [p for p in status.replicas_per_pool if p.startswith("experts-")]
        assert len(experts) == pools
