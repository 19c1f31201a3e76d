"""The gRPC APIs through Ray Serve's gRPC proxy, for real: in-process Ray, generated stubs, tritonclient.

One Ray session and one Serve application for the module, its proxy on a free 127.0.0.1 port, two
colocated models on the tiny pangu checkpoint:

- ``pangu``: ordinary limits; for output, metadata and error tests.
- ``one-seat``: one running sequence and one waiting request at most; for the full-queue test.

``tritonclient.grpc`` registers the protobuf package ``inference`` under its own file name, which
clashes with our stubs in one process, so the stock client runs in a subprocess. It sends no
Ray-specific metadata: with one application, Serve's proxy routes every call to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from ray import serve

from expertmesh.api.grpc_service import WATCH_MAX_S_ENV
from expertmesh.api.pb import generation_pb2 as gen
from expertmesh.api.pb import generation_pb2_grpc as gen_grpc
from expertmesh.api.pb import grpc_predict_v2_pb2 as oip
from expertmesh.api.pb import grpc_predict_v2_pb2_grpc as oip_grpc
from expertmesh.config import ServeConfig
from expertmesh.engine.llm import LLM
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.serve.app import deploy, grpc_options

MODEL, ONE_SEAT = "pangu", "one-seat"
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 10
RPC_TIMEOUT = 60  # generous: other Ray sessions may share the machine's two cores


@pytest.fixture(scope="module")
def app_config(pangu_tiny) -> ServeConfig:
    one_seat_engine = {"max_num_seqs": 1, "max_num_batched_tokens": 64, "max_queued_requests": 1}
    return ServeConfig.parse(
        {
            "models": [
                {"name": MODEL, "revisions": [{"source": str(pangu_tiny)}]},
                {"name": ONE_SEAT, "revisions": [{"source": str(pangu_tiny), "engine": one_seat_engine}]},
            ]
        }
    )


@pytest.fixture(scope="module")
def grpc_port(app_config, free_port):
    port = free_port()
    # Replicas inherit the driver's environment: Watch streams end after 2 s, not 5 minutes.
    before = os.environ.get(WATCH_MAX_S_ENV)
    os.environ[WATCH_MAX_S_ENV] = "2"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if before is None:
        os.environ.pop(WATCH_MAX_S_ENV)
    else:
        os.environ[WATCH_MAX_S_ENV] = before
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=grpc_options(port),
        )
        deploy(app_config)  # declaratively, as a RayService's serveConfigV2 is applied
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def channel(grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=RPC_TIMEOUT)
        yield ch


@pytest.fixture(scope="module")
def infer(channel):
    return oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def generation(channel):
    return gen_grpc.GenerationStub(channel)


SEEDED = {"temperature": 0.7, "top_p": 0.9, "seed": 7}  # a sampled request, reproducible by its seed


@pytest.fixture(scope="module")
def offline_outputs(pangu_tiny):
    """What the in-process engine makes of PROMPT: greedily, and sampled with SEEDED's seed."""
    llm = LLM(pangu_tiny, show_progress=False)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED)
    return [out.outputs[0] for out in llm.generate([PROMPT, PROMPT], [greedy, seeded], use_tqdm=False)]


@pytest.fixture(scope="module")
def offline(offline_outputs):
    return offline_outputs[0]


def text_request(model=MODEL, prompt=PROMPT, raw=False, shape=(1,), **parameters) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="req-1")
    tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=list(shape))
    data = prompt.encode()
    if raw:
        request.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
    else:
        tensor.contents.bytes_contents.append(data)
    for name, value in {
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        **parameters,
    }.items():
        param = request.parameters[name]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
    return request


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, timeout=RPC_TIMEOUT, **kwargs)
        if not hasattr(result, "ListFields"):  # a stream: the error comes while reading it
            list(result)
    error = caught.value
    assert "Traceback" not in error.details()  # an error says what was wrong, never how we crashed
    return error


# --- health, metadata, reflection ---------------------------------------------------------------


def test_health_and_metadata(channel, infer):
    assert infer.ServerLive(oip.ServerLiveRequest(), timeout=RPC_TIMEOUT).live
    assert infer.ServerReady(oip.ServerReadyRequest(), timeout=RPC_TIMEOUT).ready
    assert infer.ModelReady(oip.ModelReadyRequest(name=MODEL), timeout=RPC_TIMEOUT).ready
    server = infer.ServerMetadata(oip.ServerMetadataRequest(), timeout=RPC_TIMEOUT)
    assert server.name == "expertmesh" and server.version
    meta = infer.ModelMetadata(oip.ModelMetadataRequest(name=MODEL), timeout=RPC_TIMEOUT)
    assert meta.name == MODEL
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text_input", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("text_output", "BYTES", [1])]

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "expertmesh.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    unknown = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.Such"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    # The status now, then (none here) its changes, until the stream's time is up.
    watched = list(health.Watch(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT))
    assert [w.status for w in watched] == [health_pb2.HealthCheckResponse.SERVING]


def test_reflection_lists_the_services(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "expertmesh.v1.Generation", "grpc.health.v1.Health"} <= services


def test_list_models(generation):
    reply = generation.ListModels(gen.ListModelsRequest(), timeout=RPC_TIMEOUT)
    assert [m.name for m in reply.models] == [ONE_SEAT, MODEL]
    assert all(m.max_model_len == 2048 and m.created > 0 for m in reply.models)  # tiny pangu's context


# --- generation ---------------------------------------------------------------------------------


def test_model_infer_greedy_equals_offline(infer, offline):
    reply = infer.ModelInfer(text_request(), timeout=RPC_TIMEOUT)
    assert reply.model_name == MODEL and reply.id == "req-1"
    [output] = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("text_output", "BYTES", [1])
    assert output.contents.bytes_contents[0].decode() == offline.text
    assert reply.parameters["finish_reason"].string_param == "length"
    assert reply.parameters["completion_tokens"].int64_param == MAX_TOKENS

    # Raw contents and a [1, 1] batch: answered in kind.
    raw = infer.ModelInfer(text_request(raw=True, shape=(1, 1)), timeout=RPC_TIMEOUT)
    assert list(raw.outputs[0].shape) == [1, 1] and not raw.outputs[0].HasField("contents")
    data = raw.raw_output_contents[0]
    assert int.from_bytes(data[:4], "little") == len(data) - 4 and data[4:].decode() == offline.text


def test_generate_streams_deltas_then_finish(generation, offline):
    request = gen.GenerateRequest(
        model=MODEL,
        text=PROMPT,
        request_id="mine",
        sampling=gen.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
    )
    messages = list(generation.Generate(request, timeout=RPC_TIMEOUT))
    *deltas, last = messages
    assert deltas and all(m.WhichOneof("event") == "delta" for m in deltas)
    assert all(m.request_id == "mine" for m in messages)
    assert "".join(m.delta.text for m in deltas) == offline.text
    assert [t for m in deltas for t in m.delta.token_ids] == offline.token_ids
    assert last.WhichOneof("event") == "finish"
    assert last.finish.finish_reason == gen.FINISH_REASON_LENGTH
    stats = last.finish.stats
    assert stats.completion_tokens == MAX_TOKENS and stats.prompt_tokens > 0
    assert 0 < stats.time_to_first_token_s <= stats.total_time_s


def test_a_repeated_prompt_reports_its_cached_tokens(infer, generation):
    """GenerationStats.cached_tokens and ModelInfer's `cached_tokens` parameter: prompt tokens the
    prefix cache served, as OpenAI's usage.prompt_tokens_details.cached_tokens."""
    prompt = "def lookup(self, key):\n    return self.blocks[key]\n" * 4
    request = gen.GenerateRequest(
        model=MODEL, text=prompt, sampling=gen.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    first, second = (list(generation.Generate(request, timeout=RPC_TIMEOUT))[-1].finish for _ in range(2))
    block = 16  # the engine's default block size
    assert first.stats.prompt_tokens > 2 * block and first.stats.cached_tokens == 0
    assert second.stats.cached_tokens == (first.stats.prompt_tokens - 1) // block * block
    reply = infer.ModelInfer(text_request(prompt=prompt, max_tokens=4), timeout=RPC_TIMEOUT)
    assert reply.parameters["cached_tokens"].int64_param == second.stats.cached_tokens


def test_tritonclient_without_ray_metadata(grpc_port, offline_outputs):
    """The newest stock client, float parameters included (double_param on the wire)."""
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        client = triton.InferenceServerClient(url=sys.argv[1])
        text = triton.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([sys.argv[2].encode()], dtype=object))
        base = {"max_tokens": int(sys.argv[3]), "ignore_eos": True}
        texts = []
        for params in ({**base, "temperature": 0.0}, {**base, **json.loads(sys.argv[4])}):
            result = client.infer("pangu", [text], parameters=params, client_timeout=60)
            texts.append(result.as_numpy("text_output")[0].decode())
        out = {"live": client.is_server_live(), "ready": client.is_model_ready("pangu"), "texts": texts}
        try:
            client.infer("nope", [text], client_timeout=60)
        except InferenceServerException as exc:
            out["unknown_model"] = [exc.status(), exc.message()]
        print(json.dumps(out))
        """
    )
    args = [f"127.0.0.1:{grpc_port}", PROMPT, str(MAX_TOKENS), json.dumps(SEEDED)]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"]
    assert out["texts"] == [o.text for o in offline_outputs]
    status, message = out["unknown_model"]
    assert status == "StatusCode.NOT_FOUND" and "'nope' is not served" in message


# --- refusals -----------------------------------------------------------------------------------


def test_unknown_model_is_not_found(infer, generation):
    for error in (
        rpc_error(infer.ModelInfer, text_request(model="nope")),
        rpc_error(infer.ModelMetadata, oip.ModelMetadataRequest(name="nope")),
        rpc_error(infer.ModelReady, oip.ModelReadyRequest(name="nope")),
        rpc_error(generation.Generate, gen.GenerateRequest(model="nope", text="x")),
    ):
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'nope' is not served here; available models: 'one-seat', 'pangu'" in error.details()


def test_bad_tensors_are_invalid_arguments_naming_the_input(infer):
    wrong_type = text_request()
    wrong_type.inputs[0].datatype = "FP32"
    wrong_shape = text_request(shape=(2,))
    missing = oip.ModelInferRequest(model_name=MODEL)
    misnamed = text_request()
    misnamed.inputs[0].name = "prompt"
    cases = {
        "must have datatype BYTES, got 'FP32'": wrong_type,
        "must have shape [1] or [1, 1] (one prompt), got [2]": wrong_shape,
        "missing input 'text_input'": missing,
        "unknown input 'prompt'": misnamed,
    }
    for expected, request in cases.items():
        error = rpc_error(infer.ModelInfer, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in error.details() and "text_input" in error.details()


def test_bad_sampling_values_are_invalid_arguments_naming_the_parameter(infer, generation):
    for name, value in (("top_p", 2.0), ("temperature", -1.0), ("max_tokens", 0), ("temprature", 0.5)):
        error = rpc_error(infer.ModelInfer, text_request(**{name: value}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"invalid sampling parameter {name!r}" in error.details()
    bad = gen.GenerateRequest(model=MODEL, text="x", sampling=gen.SamplingParams(top_p=0))
    error = rpc_error(generation.Generate, bad)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid sampling parameter 'top_p'" in error.details()


def test_prompt_over_the_context_is_an_invalid_argument(infer, generation):
    # The engine refuses it in its own replica: the message crosses Ray and reaches the client whole.
    too_long = gen.GenerateRequest(model=MODEL, token_ids=gen.TokenIds(ids=[5] * 2048))
    for error in (
        rpc_error(generation.Generate, too_long),
        rpc_error(infer.ModelInfer, text_request(prompt="hello " * 2048)),
    ):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_model_len is 2048" in error.details()


def test_full_queue_is_resource_exhausted_at_once_and_cancelled_infers_are_aborted(infer, generation):
    # The engine's pace tells how long a long request would hold the one seat.
    started = time.monotonic()
    sampling = gen.SamplingParams(max_tokens=50, ignore_eos=True)
    list(
        generation.Generate(
            gen.GenerateRequest(model=ONE_SEAT, text=PROMPT, sampling=sampling), timeout=RPC_TIMEOUT
        )
    )
    seconds_per_token = (time.monotonic() - started) / 50
    long = 2000

    # One seat and one waiting place: of three long requests, one at least is refused, at once.
    calls = [
        infer.ModelInfer.future(text_request(model=ONE_SEAT, max_tokens=long), timeout=RPC_TIMEOUT)
        for _ in range(3)
    ]
    try:
        started = time.monotonic()
        while not any(c.done() for c in calls):
            assert time.monotonic() - started < 20, "no request was refused"
            time.sleep(0.01)
        refused = next(c for c in calls if c.done())
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests=1" in refused.details()
        assert time.monotonic() - started < 10  # not after a wait for the seat
    finally:
        for call in calls:
            call.cancel()

    # Cancelled calls are aborted in the engine (Serve cancels the Router's task, and with it the
    # Engine replica's): seat and place are free long before a long request could have ended. Until
    # the cancellations arrive, a probe may still be refused; then both are served.
    deadline = time.monotonic() + max(2.0, 0.3 * long * seconds_per_token)
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the cancelled requests still hold the engine"
        probes = [
            infer.ModelInfer.future(text_request(model=ONE_SEAT, max_tokens=2), timeout=left)
            for _ in range(2)
        ]
        codes = [p.code() for p in probes]
        if codes == [grpc.StatusCode.OK] * 2:
            break
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        time.sleep(0.05)


# --- last: it redeploys the Router with an API key ---------------------------------------------


def test_api_key_guards_all_but_health(app_config, infer, channel):
    key = "grpc-test-key"
    deploy(app_config.model_copy(update={"api_key": key}))  # the Router restarts; engines stay
    # Until the proxy has moved to the new Router replica, a call may still reach the old one.
    deadline = time.monotonic() + RPC_TIMEOUT
    while True:
        try:
            infer.ModelMetadata(oip.ModelMetadataRequest(name=MODEL), timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <key>" in error.details() and key not in error.details()
            break
        assert time.monotonic() < deadline, "the API key was never demanded"
        time.sleep(0.2)
    assert rpc_error(infer.ModelInfer, text_request()).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = [("authorization", "Bearer nope")]
    assert (
        rpc_error(infer.ModelInfer, text_request(), metadata=wrong).code() == grpc.StatusCode.UNAUTHENTICATED
    )
    reply = infer.ModelInfer(
        text_request(), timeout=RPC_TIMEOUT, metadata=[("authorization", f"Bearer {key}")]
    )
    assert reply.parameters["completion_tokens"].int64_param == MAX_TOKENS
    # Health stays open.
    assert infer.ServerLive(oip.ServerLiveRequest(), timeout=RPC_TIMEOUT).live
    assert infer.ServerReady(oip.ServerReadyRequest(), timeout=RPC_TIMEOUT).ready
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
