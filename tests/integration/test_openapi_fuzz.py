"""Schemathesis against the live OpenAI API, with every check on, in both generation modes.

Positive mode (schema-valid requests): every answer is declared in the server's own OpenAPI document
(status, content type, headers such as Allow and Retry-After) and matches the declared schema, none
is a server error, and each request is accepted (positive_data_acceptance): the request schemas
state every limit the server enforces that does not depend on the served model. Negative mode
(schema-invalid requests): each is refused with a 4xx (negative_data_rejection).

Bounded in examples per operation and mode and, through a short context, in generation length.
"""

import collections
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_openai_http import serving

from expertmesh.api.engine_client import LocalEngineClient
from expertmesh.api.openai_app import build_openai_app
from expertmesh.engine.async_engine import AsyncLLMEngine

MODEL = "pangu-demo"
# A short context bounds generation, since chat generates until the context is full by default and
# a fuzzed max_tokens may be huge; it still holds most fuzzed prompts (those it does not are the
# "context" refusals that limit_of_the_served_model excuses).
MAX_MODEL_LEN = 256
GENERATIONS = ("POST /v1/completions", "POST /v1/chat/completions")
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def served(make_engine, pangu_tiny):
    client = LocalEngineClient()
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=MAX_MODEL_LEN)
    client.add(MODEL, AsyncLLMEngine(engine), pangu_tiny)
    with serving(build_openai_app(client)) as port:
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json"), engine
    client.shutdown()


def limit_of_the_served_model(case, response, vocab_size: int) -> str | None:
    """Which limit of the served model, if any, this 400 is about: the context length and the
    vocabulary belong to the model behind the name, not to the API, so no static schema can state
    them (the document says where to read the context length: `max_model_len` of GET /v1/models).
    Each is recognised only by the engine's exact message, and only when the request really
    passed that limit, so that no other 400 is excused."""
    if response.status_code != 400:
        return None
    error = response.json()["error"]
    if error["param"] not in ("prompt", "messages"):
        return None
    if match := re.fullmatch(
        r"prompt has (\d+) tokens but max_model_len is (\d+); shorten the prompt "
        r"\(room must remain for at least one new token\)",
        error["message"],
    ):
        tokens, context = map(int, match.groups())
        assert context == MAX_MODEL_LEN and tokens >= context, error
        return "context"
    if match := re.fullmatch(
        r"prompt token id (\d+) is outside the vocabulary \[0, (\d+)\)", error["message"]
    ):
        token, vocab = map(int, match.groups())
        assert vocab == vocab_size and token >= vocab and error["param"] == "prompt", error
        ids = case.body["prompt"]
        flat = [t for item in ids for t in (item if isinstance(item, list) else [item])]
        assert token in flat, (token, ids)
        return "vocabulary"
    return None


def fuzz(operation, mode: GenerationMode, vocab_size: int) -> collections.Counter:
    """EXAMPLES generated requests to ``operation`` in ``mode``, each answer put to every check;
    returns how often each status was seen, and which of the 400s were the served model's limits."""
    seen: collections.Counter = collections.Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def answers_rightly(case):
        if isinstance(case.body, dict) and (mode.is_positive or isinstance(case.body.get("model"), str)):
            # The served model's name is the server's, not the API's. In negative mode a string
            # `model` is valid, so something else was made invalid and stays so.
            case.body["model"] = MODEL
        if case.path_parameters and mode.is_positive:
            case.path_parameters["model"] = MODEL
        response = case.call(timeout=60)
        limit = limit_of_the_served_model(case, response, vocab_size) if mode.is_positive else None
        case.validate_response(
            response,
            excluded_checks=[positive_data_acceptance] if limit else [],
            transport_kwargs={"timeout": 60},
        )
        seen[response.status_code] += 1
        if limit:
            seen[f"400 for the model's {limit}"] += 1

    answers_rightly()
    return seen


def test_every_answer_is_declared_and_every_request_judged_rightly(served):
    """Each operation's strategy driven by Hypothesis directly (schemathesis' pytest plugin does
    not run under this pytest), in positive and negative mode."""
    openapi_schema, engine = served
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {*GENERATIONS, "GET /v1/models"}
    statuses: dict[tuple[str, str], collections.Counter] = {}
    no_negative_data = []
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                statuses[label, mode.value] = fuzz(operation, mode, engine.model.config.vocab_size)
            except Unsatisfiable:
                no_negative_data.append(label)
                assert not mode.is_positive, label
    # Negative data exists only for operations that take input the schema can refuse: the GETs
    # take none but the path's model name, and any string is a valid name.
    assert not set(GENERATIONS) & set(no_negative_data), no_negative_data
    for label in GENERATIONS:
        positive, negative = statuses[label, "positive"], statuses[label, "negative"]
        # positive mode reached real generations; negative mode ran, and was refused every time
        assert positive[200] >= EXAMPLES // 5, positive
        assert {status for status in positive if isinstance(status, int)} <= {200, 400}, positive
        assert set(negative) == {400} and negative[400] >= EXAMPLES // 2, negative
