"""An expert pool with no live replica, through both APIs: a disaggregated engine whose group 0
has one replica endpoint that accepts and never answers (every replica of the pool gone), the
other groups served by real expert servers.

Each request fails in bounded time (the backend's timeout), as 503 with Retry-After over HTTP
and UNAVAILABLE over gRPC, naming the group, and leaves nothing behind in the engine. The gRPC
service runs here without its transport (Serve's gRPC proxy carries it in test_grpc.py, where
pools cannot be made to stay down).
"""

from __future__ import annotations

import asyncio

import grpc
import openai
import pytest
import zmq
from test_openai_http import PROMPT, idle, serving

from expertmesh.api.engine_client import LocalEngineClient
from expertmesh.api.grpc_service import GrpcAbort, GrpcServicesMixin
from expertmesh.api.openai_app import build_openai_app
from expertmesh.api.pb import generation_pb2 as gen
from expertmesh.api.pb import grpc_predict_v2_pb2 as oip
from expertmesh.engine.async_engine import AsyncLLMEngine
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.model.experts import ExpertPartition
from expertmesh.model.loader import load_config, load_expert_group, load_model
from expertmesh.model.tokenizer_files import load_tokenizer, stop_token_ids
from expertmesh.serve.expert_transport import ExpertGroupServer
from expertmesh.serve.remote_experts import RemoteExpertBackend

MODEL = "pool-down"


class LocalServices(GrpcServicesMixin, LocalEngineClient):
    """The gRPC services over in-process engines: what the Router deployment is, without Ray."""


@pytest.fixture(scope="module")
def pool_down(pangu_tiny):
    cfg = load_config(pangu_tiny)
    groups = cfg.moe.num_routing_groups
    live = {g: ExpertGroupServer(load_expert_group(pangu_tiny, g, groups)) for g in range(1, groups)}
    dead = zmq.Context.instance().socket(zmq.ROUTER)
    dead.setsockopt(zmq.LINGER, 0)
    dead_endpoint = f"tcp://127.0.0.1:{dead.bind_to_random_port('tcp://127.0.0.1')}"
    backend = RemoteExpertBackend(
        ExpertPartition(cfg.moe.num_experts, groups),
        {0: [dead_endpoint], **{g: [server.endpoint] for g, server in live.items()}},
        timeout_s=0.5,
    )
    model = load_model(pangu_tiny, load_experts=False)
    model.set_expert_backend(backend)
    engine = LLMEngine(model, load_tokenizer(pangu_tiny), stop_token_ids(pangu_tiny, cfg.eos_token_ids))
    services = LocalServices()
    services.add(MODEL, AsyncLLMEngine(engine), pangu_tiny)
    yield services, engine
    services.shutdown()
    backend.close()
    dead.close(linger=0)
    for server in live.values():
        server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_http_answers_503_with_retry_after_naming_the_group(pool_down, stream):
    services, engine = pool_down
    with serving(build_openai_app(services)) as port:
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as caught:
            reply = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=stream)
            if stream:
                list(reply)
    error = caught.value
    assert error.status_code == 503 and error.response.headers["Retry-After"] == "5"
    assert error.body["type"] == "service_unavailable_error"
    assert "expert group 0" in error.body["message"]
    assert idle(engine)  # the failed request's cache is free, nothing waits


def test_grpc_answers_unavailable_naming_the_group(pool_down):
    services, engine = pool_down
    infer = oip.ModelInferRequest(model_name=MODEL)
    infer.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        PROMPT.encode()
    )
    infer.parameters["max_tokens"].int64_param = 4
    generate = gen.GenerateRequest(model=MODEL, text=PROMPT, sampling=gen.SamplingParams(max_tokens=4))

    async def stream_all():
        return [message async for message in services.Generate(generate)]

    for call in (lambda: services.ModelInfer(infer), stream_all):
        with pytest.raises(GrpcAbort) as caught:
            asyncio.run(call())
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "expert group 0" in caught.value.details
    assert idle(engine)
