"""The OpenAI-compatible HTTP API, for real: uvicorn on 127.0.0.1, the stock `openai` client.

One server for the module, around a LocalEngineClient with two engines on the tiny pangu model:

- ``pangu-tiny``: ordinary limits; for output and error tests.
- ``pangu-tiny-1seat``: one running sequence, one waiting request, no EOS (so a request runs for as
  long as its max_tokens); for queue-full and disconnect tests, whose timing it makes deterministic.

Raw sockets stand in for clients that vanish mid-request. Waits poll with bounded timeouts.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import openai
import pytest
import uvicorn
from polling import wait_until

from expertmesh.api.chat_template import ChatTemplate
from expertmesh.api.engine_client import LocalEngineClient
from expertmesh.api.openai_app import build_openai_app
from expertmesh.engine.async_engine import AsyncLLMEngine
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams

MODEL, ONE_SEAT = "pangu-tiny", "pangu-tiny-1seat"
PROMPT = "def fibonacci(n):"
LONG = 1500  # max_tokens that no test waits for: such requests end by abort


class RecordingClient(LocalEngineClient):
    """The real LocalEngineClient, remembering the prompt each request id was given."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: dict[str, str | list[int]] = {}

    def generate(self, model, prompt, params, request_id, stream=True):
        self.prompts[request_id] = prompt
        return super().generate(model, prompt, params, request_id, stream)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    wait_until(condition, what, timeout_s=timeout, every_s=0.005)


@contextmanager
def serving(app) -> Iterator[int]:
    """Run ``app`` under uvicorn on a free port in a background thread; yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="uvicorn to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def engines(make_engine, pangu_tiny):
    client = RecordingClient()
    client.add(MODEL, AsyncLLMEngine(make_engine(max_num_seqs=8, max_num_batched_tokens=256)), pangu_tiny)
    one_seat = make_engine(
        eos_token_ids=set(), max_num_seqs=1, max_num_batched_tokens=64, max_queued_requests=1
    )
    client.add(ONE_SEAT, AsyncLLMEngine(one_seat), pangu_tiny)
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def port(engines) -> Iterator[int]:
    with serving(build_openai_app(engines)) as port:
        yield port


@pytest.fixture
def oai(port) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def engines_left_idle(engines):
    """Every test must leave both engines with no request and every KV block free."""
    yield
    for name in (MODEL, ONE_SEAT):
        wait_for(lambda n=name: idle(engines.engine(n).engine), what=f"{name} to be idle")


def idle(engine: LLMEngine) -> bool:
    return not engine.has_unfinished_requests() and engine.allocator.num_free == engine.allocator.num_blocks


def offline_greedy(pangu_llm, prompt: str | list[int], max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return pangu_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


# --- raw HTTP, for clients that go away ----------------------------------------------------------


def raw_post(port: int, path: str, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; got {got[:500]!r}")
        got += chunk
    return got


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def only_sequence(engine: LLMEngine):
    wait_for(lambda: len(engine._requests) == 1, what="the request to reach the engine")
    (seq,) = engine._requests.values()
    return seq


# --- outputs -------------------------------------------------------------------------------------


def test_models_lists_every_served_model(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL, ONE_SEAT]
    assert all(m.object == "model" and m.owned_by == "expertmesh" and m.created > 0 for m in models)
    assert oai.models.retrieve(MODEL).id == MODEL


def test_completion_equals_offline_greedy_generate(oai, pangu_llm, engines):
    result = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == MODEL
    (choice,) = result.choices
    assert choice.text == offline_greedy(pangu_llm, PROMPT, 12)
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = pangu_llm.engine.tokenize(PROMPT)[1]
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert engines.prompts[result.id] == PROMPT


def test_completion_of_token_ids_equals_completion_of_text(oai, pangu_llm):
    ids = pangu_llm.engine.tokenize(PROMPT)[1]
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completion_stream_concatenates_to_the_full_text(oai):
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks[:-1]] == [None] * (len(text_chunks) - 1)
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_over_the_wire(port):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_chat_completion_sends_the_rendered_template_and_streams_the_same_text(
    oai, engines, pangu_llm, pangu_tiny
):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a loop."},
    ]
    result = oai.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0
    )
    rendered = ChatTemplate.from_checkpoint(pangu_tiny).render(messages)
    assert (
        rendered
        == "[unused9]系统：You are terse.[unused10][unused9]用户：Write a loop.[unused10][unused9]助手："
    )
    # sent as rendered: no special tokens of the tokenizer's own (the template writes its own)
    as_rendered = pangu_llm.engine.tokenize(rendered, add_special_tokens=False)[1]
    assert engines.prompts[result.id] == as_rendered
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == offline_greedy(pangu_llm, as_rendered, 10)

    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_seeded_sampling_is_reproducible(oai):
    def sample():
        return oai.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=7,
            extra_body={"top_k": 50},
        )

    assert sample().choices[0].text == sample().choices[0].text


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": -1}),
        ("top_p", {"top_p": 1.5}),
        ("max_tokens", {"max_tokens": 0}),
        ("n", {"n": 2}),
        ("stop", {"stop": [""]}),
        ("top_k", {"extra_body": {"top_k": -7}}),
        ("logprobs", {"logprobs": 3}),
        ("presence_penalty", {"presence_penalty": 0.5}),
        ("seed", {"seed": 2**63}),
        ("stop", {"stop": ["x"] * 17}),
        ("stream_options", {"stream_options": {"include_usage": True}}),  # without stream=true
        ("max_tokens", {"extra_body": {"max_tokens": "5"}}),  # the document says integer
        ("ignore_eos", {"extra_body": {"ignore_eos": 1}}),  # ... and boolean
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": [-1]}),
    ],
)
def test_bad_sampling_values_are_400_naming_the_field(oai, field, kwargs):
    kwargs = {"prompt": PROMPT} | kwargs
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, **kwargs)
    assert caught.value.status_code == 400
    assert f"{field}" in caught.value.message
    assert caught.value.body["param"] == field
    assert caught.value.body["type"] == "invalid_request_error"


def test_unsupported_values_say_what_is_allowed(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=PROMPT, n=2)
    assert caught.value.body["code"] == "unsupported_value"
    assert caught.value.body["message"] == (
        "invalid 'n': 2 is not supported by this server: leave it out or send null or 1"
    )


def test_neutral_values_of_unsupported_fields_and_near_zero_temperatures_are_served(oai, pangu_llm):
    """Defaults that clients send for what this server does not implement are taken; 16.0 is an
    integer, as in JSON Schema; and a temperature below 1e-5 is greedy (vLLM), down to one so small
    that sampling at it would overflow float32."""
    result = oai.completions.create(
        model=MODEL,
        prompt=[PROMPT],
        n=1,
        best_of=1,
        logprobs=0,
        echo=False,
        suffix="",
        logit_bias={},
        presence_penalty=0.0,
        frequency_penalty=0,
        extra_body={"max_tokens": 6.0, "temperature": 1e-40, "response_format": {"type": "text"}},
    )
    assert result.choices[0].text == offline_greedy(pangu_llm, PROMPT, 6)
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
        max_completion_tokens=2,
        logprobs=False,
        top_logprobs=0,
        tools=[],
        tool_choice="none",
        modalities=["text"],
    )
    assert chat.choices[0].message.role == "assistant"


def test_bad_chat_values_are_400_naming_the_field(oai):
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=user, max_completion_tokens=0)
    assert caught.value.body["param"] == "max_completion_tokens"
    for messages in ([{"role": "wizard", "content": "hi"}], [{"role": "user"}], []):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model=MODEL, messages=messages)
        assert caught.value.body["param"] == "messages" and "messages" in caught.value.message


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="nope", prompt=PROMPT)
    assert caught.value.body["code"] == "model_not_found" and "nope" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_prompt_over_the_context_is_400(oai, engines):
    too_long = [5] * engines.model_info(MODEL).max_model_len
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=too_long, max_tokens=1)
    assert caught.value.body["param"] == "prompt" and "max_model_len" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 5000}])
    assert caught.value.body["param"] == "messages"


def test_batches_of_prompts_are_400(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=["a", "b"])
    assert caught.value.body["param"] == "prompt" and "one prompt per request" in caught.value.message


def test_malformed_bodies_get_openai_error_shapes(port):
    def post(path: str, data: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    status, body = post("/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post("/v1/completions", json.dumps({"prompt": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "model"
    status, body = post("/v1/nowhere", b"{}")
    assert status == 404 and "message" in body["error"]


def test_the_openapi_document_declares_the_answers_the_server_gives(port):
    """OpenAI's error shape for 400/401/404/405/429/500/503, Retry-After and Allow declared, and
    none of FastAPI's 422s: this server answers a bad body with a 400."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10) as response:
        doc = json.load(response)
    assert "422" not in json.dumps(doc["paths"]) and "HTTPValidationError" not in json.dumps(doc)
    for path in ("/v1/completions", "/v1/chat/completions"):
        answers = doc["paths"][path]["post"]["responses"]
        assert set(answers) == {"200", "400", "401", "404", "405", "429", "500", "503"}
        for status in ("400", "404", "429", "503"):
            schema = answers[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
        assert {"Retry-After"} == set(answers["429"]["headers"]) == set(answers["503"]["headers"])
        assert "Allow" in answers["405"]["headers"]
        assert "text/event-stream" in answers["200"]["content"]
    assert "404" in doc["paths"]["/v1/models/{model}"]["get"]["responses"]


def test_a_wrong_method_is_405_with_allow(port):
    """RFC 9110: a 405 names the methods the resource takes."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 405 and caught.value.headers["Allow"] == "POST"
    assert json.load(caught.value)["error"]["type"] == "invalid_request_error"


def test_full_queue_is_429_at_once_and_the_queue_drains(oai, port, engines):
    engine = engines.engine(ONE_SEAT).engine
    long_request = {"model": ONE_SEAT, "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    runner = raw_post(port, "/v1/completions", long_request)  # takes the only seat...
    read_until(runner, b"data: {")
    waiter = raw_post(port, "/v1/completions", {"model": ONE_SEAT, "prompt": PROMPT, "max_tokens": 3})
    wait_for(
        lambda: len(engine.scheduler.waiting) == 1, what="the second request to queue"
    )  # ...and the queue
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        oai.completions.create(model=ONE_SEAT, prompt=PROMPT, max_tokens=3)
    assert caught.value.status_code == 429 and time.monotonic() - started < 5
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert caught.value.response.headers["Retry-After"] == "1"
    hang_up(runner)  # frees the seat: the waiting request runs and answers
    reply = read_until(waiter, b'"usage"')
    waiter.close()
    assert reply.startswith(b"HTTP/1.1 200")


def test_client_leaving_mid_stream_aborts_and_frees_the_cache(port, engines):
    engine = engines.engine(ONE_SEAT).engine
    sock = raw_post(
        port, "/v1/completions", {"model": ONE_SEAT, "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    )
    read_until(sock, b"data: {")
    seq = only_sequence(engine)
    assert engine.allocator.num_free < engine.allocator.num_blocks
    hang_up(sock)
    wait_for(lambda: idle(engine), timeout=10, what="the cache to be freed")
    assert seq.finish_reason == "abort" and len(seq.output_token_ids) < LONG


def test_client_leaving_a_non_streaming_request_aborts_it(port, engines):
    engine = engines.engine(ONE_SEAT).engine
    sock = raw_post(
        port,
        "/v1/chat/completions",
        {
            "model": ONE_SEAT,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": LONG,
        },
    )
    seq = only_sequence(engine)
    wait_for(lambda: len(seq.output_token_ids) > 0, what="the first token")
    hang_up(sock)
    wait_for(lambda: idle(engine), timeout=10, what="the cache to be freed")
    assert seq.finish_reason == "abort" and len(seq.output_token_ids) < LONG


def test_client_leaving_while_queued_is_dropped_from_the_queue(port, engines):
    """No token is ever sent to a queued request, so only the disconnect watcher can notice it left."""
    engine = engines.engine(ONE_SEAT).engine
    runner = raw_post(
        port, "/v1/completions", {"model": ONE_SEAT, "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    )
    read_until(runner, b"data: {")
    queued = raw_post(
        port, "/v1/completions", {"model": ONE_SEAT, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    )
    wait_for(lambda: len(engine.scheduler.waiting) == 1, what="the second request to queue")
    (seq,) = engine.scheduler.waiting
    hang_up(queued)
    wait_for(lambda: not engine.scheduler.waiting, timeout=10, what="the queued request to be dropped")
    assert seq.finish_reason == "abort" and engine.scheduler.running  # the runner is untouched
    hang_up(runner)


def test_a_request_aborted_by_the_server_ends_its_stream_with_finish_reason_abort(oai, engines):
    stream = oai.completions.create(model=ONE_SEAT, prompt=PROMPT, max_tokens=LONG, stream=True)
    first = next(iter(stream))
    assert engines.engine(ONE_SEAT).abort(first.id) is True
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "abort"
    assert all(c.choices[0].finish_reason is None for c in [first, *rest[:-1]])


class BrokenClient(LocalEngineClient):
    def generate(self, model, prompt, params, request_id, stream=True):
        raise RuntimeError("internal detail the client must not see")


def test_unexpected_errors_are_500_in_openai_shape_and_logged(engines, pangu_tiny, caplog):
    broken = BrokenClient().add(MODEL, engines.engine(MODEL), pangu_tiny)
    with serving(build_openai_app(broken)) as port:
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            oai.completions.create(model=MODEL, prompt=PROMPT)
    assert caught.value.status_code == 500 and caught.value.body["type"] == "internal_error"
    assert "internal detail" not in caught.value.message and "Traceback" not in caught.value.message
    assert any("internal detail" in r.getMessage() or r.exc_info for r in caplog.records)


# --- API key -------------------------------------------------------------------------------------


def test_api_key_is_demanded_when_set(engines):
    with serving(build_openai_app(engines, api_key="s3cret")) as port:
        url = f"http://127.0.0.1:{port}/v1"
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL, ONE_SEAT]
        bad = openai.OpenAI(base_url=url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.completions.create(model=MODEL, prompt=PROMPT)
        assert "s3cret" not in caught.value.message
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200


def test_a_repeated_prompt_reports_its_cached_tokens(oai):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: the second time, every full cache
    block before the prompt's last token comes from the prefix cache, and the answer is the same."""
    prompt = "class Cache:\n    def lookup(self, key):\n        return self.blocks[key]\n" * 3
    greedy = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    first, second = oai.completions.create(**greedy), oai.completions.create(**greedy)
    block = 16  # the engine's default block size
    assert first.usage.prompt_tokens > 2 * block
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert (
        second.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // block * block
    )
    assert second.choices[0].text == first.choices[0].text
    chunks = list(oai.completions.create(**greedy, stream=True, stream_options={"include_usage": True}))
    assert (
        chunks[-1].usage.prompt_tokens_details.cached_tokens
        == second.usage.prompt_tokens_details.cached_tokens
    )
