"""Schemathesis against the live OpenAI API: every answer the server gives to generated, schema-valid
requests is declared in its own OpenAPI document (status, content type, headers such as Allow and
Retry-After) and matches the declared schema, and none is a server error; bounded in examples
per operation and, through a short context, in generation length."""

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_openai_http import serving

from expertmesh.api.engine_client import LocalEngineClient
from expertmesh.api.openai_app import build_openai_app
from expertmesh.engine.async_engine import AsyncLLMEngine

MODEL = "pangu-demo"
# Every check but one. positive_data_acceptance (ST202) asks that each schema-valid request be
# served, and the request schemas do not yet carry every limit the engine enforces (an empty
# prompt, max_tokens >= 1, n = 1, stop strings, chat roles): those answer a 400 naming the field.
# Issue #22 keeps this open until the schemas state them, and until invalid-data generation
# (schemathesis' negative mode) runs here too.
NOT_YET = [positive_data_acceptance]


@pytest.fixture(scope="module")
def openapi_schema(make_engine, pangu_tiny):
    client = LocalEngineClient()
    # a short context bounds what a fuzzed max_tokens can ask for
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=96)
    client.add(MODEL, AsyncLLMEngine(engine), pangu_tiny)
    with serving(build_openai_app(client)) as port:
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    client.shutdown()


def test_every_answer_is_declared_and_matches_its_schema(openapi_schema):
    """Each operation's strategy driven by Hypothesis directly (schemathesis' pytest plugin does
    not run under this pytest), with the served model's name put in so requests generate."""
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
    }
    seen: collections.Counter = collections.Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_as_declared(case):
            if isinstance(case.body, dict):
                case.body["model"] = MODEL
            if case.path_parameters:
                case.path_parameters["model"] = MODEL
            seen[case.call_and_validate(timeout=60, excluded_checks=NOT_YET).status_code] += 1

        answers_as_declared()
    assert {200, 400} <= set(seen), seen  # it reached real generations and real refusals
