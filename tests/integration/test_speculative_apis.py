"""Speculative decoding through both APIs: an engine with n-gram proposals behind the OpenAI HTTP
API and the gRPC Generate service answers a greedy request with the plain engine's tokens, and its
proposals were verified (gRPC's service runs without its transport here; test_grpc.py carries it
through Serve's proxy)."""

from __future__ import annotations

import asyncio

import openai
from test_openai_http import serving
from test_pool_down import LocalServices

from expertmesh.api.openai_app import build_openai_app
from expertmesh.api.pb import generation_pb2 as gen
from expertmesh.engine.async_engine import AsyncLLMEngine

MODEL = "speculative"
PROMPT = "for i in range(10):\n    print(i)\n" * 6  # text that repeats: lookup finds proposals
MAX_TOKENS = 24


def test_http_and_grpc_answer_with_the_plain_engines_tokens(make_engine, greedy_reference, pangu_tiny):
    engine = make_engine(speculative={"num_tokens": 4})
    services = LocalServices()
    services.add(MODEL, AsyncLLMEngine(engine), pangu_tiny)
    want = greedy_reference(PROMPT, MAX_TOKENS)
    try:
        with serving(build_openai_app(services)) as port:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            reply = client.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        assert reply.choices[0].text == want.text and reply.usage.completion_tokens == MAX_TOKENS
        request = gen.GenerateRequest(
            model=MODEL,
            text=PROMPT,
            sampling=gen.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
        )

        async def generate():
            return [m async for m in services.Generate(request)]

        messages = asyncio.run(generate())
        assert [t for m in messages[:-1] for t in m.delta.token_ids] == want.token_ids
        assert messages[-1].finish.stats.completion_tokens == MAX_TOKENS
        assert engine.speculative_stats()["accepted"] > 0
    finally:
        services.shutdown()
