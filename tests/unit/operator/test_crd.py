from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from expertmesh_operator.crd import (
    CRD_NAME,
    ModelResource,
    ModelResourceSpec,
    ModelResourceStatus,
    crd_manifest,
    crd_yaml,
    openapi_schema,
)

CRD_FILE = Path(__file__).parents[3] / "helm" / "expertmesh" / "crds" / f"{CRD_NAME}.yaml"

VALID = {
    "apiVersion": "serving.expertmesh.io/v1alpha1",
    "kind": "Model",
    "metadata": {"name": "pangu"},
    "spec": {
        "source": {"pvc": {"claimName": "weights", "path": "pangu-pro-moe"}},
        "version": "v2",
        "expertParallel": {"enabled": True, "groups": 8, "replicasPerGroup": 2, "maxReplicasPerGroup": 4},
        "engineReplicas": 2,
        "resources": {"experts": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}},
        "autoscaling": {
            "queueDepthPerReplica": 8,
            "tpotP95Seconds": 0.05,
            "scaleDownStabilizationSeconds": 600,
        },
        "rollout": {
            "canary": {"steps": [10, 50, 100], "pauseSeconds": 120, "analysis": {"maxErrorRatio": 0.02}}
        },
        "limits": {"maxContext": 8192, "maxBatchTokens": 2048},
    },
}


def _validator() -> jsonschema.Validator:
    return jsonschema.Draft4Validator(openapi_schema())


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_committed_crd_matches_the_pydantic_models():
    assert CRD_FILE.read_text() == crd_yaml(), (
        "the committed CRD drifted from expertmesh_operator.crd; regenerate it with "
        "`python -m expertmesh_operator.crd > helm/expertmesh/crds/models.serving.expertmesh.io.yaml`"
    )


def test_schema_is_structural():
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in _walk(schema):
        assert "$ref" not in node and "title" not in node and "const" not in node
        if "anyOf" in node:
            assert all(set(b) == {"required"} for b in node["anyOf"])
        if "properties" in node:
            assert node.get("type") == "object"
            assert "additionalProperties" not in node
    assert schema["properties"]["spec"]["properties"]["source"]["oneOf"]


def test_crd_has_status_short_name_and_printer_columns():
    crd = crd_manifest()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "models.serving.expertmesh.io"
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert "mdl" in crd["spec"]["names"]["shortNames"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready", "Revision", "Traffic", "Replicas", "Age",
    ]  # fmt: skip
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"][:4]:
        assert column["jsonPath"].removeprefix(".status.") in status_props


def test_valid_example_passes_schema_and_pydantic():
    _validator().validate(VALID)
    model = ModelResource.from_object(VALID)
    assert model.spec.source.path() == "/mnt/models/weights/pangu-pro-moe"
    assert model.spec.expert_parallel.replicas_per_group == 2


def test_minimal_example_passes():
    minimal = {"metadata": {"name": "tiny"}, "spec": {"source": {"checkpoint": "/ckpt/tiny"}}}
    _validator().validate(minimal)
    assert ModelResource.from_object(minimal).spec.version == "v1"


def _mutated(path: list[str], value=None, delete: bool = False) -> dict:
    obj = copy.deepcopy(VALID)
    node = obj
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(_mutated(["spec", "source"], delete=True), id="missing-source"),
        pytest.param(_mutated(["spec", "source"], {}), id="empty-source"),
        pytest.param(
            _mutated(["spec", "source"], {"checkpoint": "/a", "pvc": {"claimName": "w"}}), id="two-sources"
        ),
        pytest.param(_mutated(["spec", "engineReplicas"], -1), id="negative-replicas"),
        pytest.param(_mutated(["spec", "expertParallel", "replicasPerGroup"], 0), id="zero-group-replicas"),
        pytest.param(_mutated(["spec", "architecture"], {"dtype": "float8"}), id="unknown-enum"),
        pytest.param(_mutated(["spec", "version"], "v" * 64), id="too-long-version"),
        pytest.param(_mutated(["spec", "servedName"], "m" * 64), id="too-long-name"),
        pytest.param(
            _mutated(["spec", "resources", "experts", "requests", "memory"], "lots"), id="bad-quantity"
        ),
        pytest.param(_mutated(["spec", "autoscaling", "tolerance"], 2), id="tolerance-out-of-range"),
    ],
)
def test_schema_rejects_invalid(obj):
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(obj)
    with pytest.raises(ValueError):  # pydantic agrees with the schema
        ModelResourceSpec.model_validate(obj["spec"])


def test_status_round_trips_through_the_schema():
    status = ModelResourceStatus.model_validate(
        {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Serving",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "observedGeneration": 3,
            "revisions": [{"name": "v1", "traffic": 90}, {"name": "v2", "traffic": 10}],
            "replicasPerPool": {"engine-pangu-v1": 2},
            "ready": "True",
            "revision": "v1",
            "traffic": "v1=90,v2=10",
            "replicas": 2,
        }
    )
    obj = {**VALID, "status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}
    _validator().validate(obj)


def test_cli_output_is_parseable_yaml():
    assert yaml.safe_load(crd_yaml())["kind"] == "CustomResourceDefinition"
