"""Prefix-aware routing: two engine replicas behind the Router, four system prompts interleaved;
served throughput with our prefix-aware request router against Serve's default one.

Workload (fixed, issue #23): the `small` qwen2_moe checkpoint, fp32, two engine replicas of one
thread each (the machine's 2 cores), prefix caching on in both. 32 requests as token ids: four
512-token prefixes, each request one of them (in turn: 0, 1, 2, 3, 0, ...) plus 32 tokens of its
own, 16 new tokens, greedy, 8 in flight at a time, over the OpenAI HTTP API. Each mode deploys
fresh engines (empty caches), warmed up on prompts that share nothing with the workload. Prints
the CPU, output tokens/s, TTFT p50 / p90 and each replica's prefix-cache hit ratio per mode,
then `ratio prefix-aware/default-routing`.

    .venv/bin/python bench/prefix_routing.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import torch
from ray import serve
from serving import local_serve  # bench/ is the script's directory: a fresh local Ray with Serve
from small_checkpoint import CHECKPOINTS, small_checkpoint

from expertmesh.config import ServeConfig
from expertmesh.kernels.isa import cpu_model
from expertmesh.serve.app import deploy
from expertmesh.serve_layout import engine_deployment_name, revision_app_name

CHECKPOINT = CHECKPOINTS / "qwen2_moe-small"
MODEL = "routed"
PREFIXES, PREFIX_LEN, REQUESTS, OWN_LEN, NEW_TOKENS, IN_FLIGHT = 4, 512, 32, 32, 16, 8


def workload(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefixes = torch.randint(3, vocab, (PREFIXES, PREFIX_LEN), generator=gen).tolist()
    own = torch.randint(3, vocab, (REQUESTS, OWN_LEN), generator=gen).tolist()
    return [prefixes[i % PREFIXES] + own[i] for i in range(REQUESTS)]


async def send_all(url: str, prompts: list[list[int]]) -> tuple[float, list[float], int]:
    """(seconds, each request's time to first token, output tokens), IN_FLIGHT at a time."""
    import openai

    gate = asyncio.Semaphore(IN_FLIGHT)
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600
    ) as client:

        async def one(prompt: list[int]) -> tuple[float, int]:
            async with gate:
                sent = time.perf_counter()
                first, tokens = None, 0
                stream = await client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=NEW_TOKENS,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.perf_counter() - sent
                    tokens += 1 if chunk.choices and chunk.choices[0].text else 0
                return first or 0.0, tokens

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def run_mode(url: str, routing: str, prompts: list[list[int]], vocab: int) -> dict:
    revision = {
        "source": str(CHECKPOINT),
        "dtype": "float32",
        "engine_replicas": 2,
        "engine_threads": 1,
        "engine_routing": routing,
        "engine": {"max_num_seqs": IN_FLIGHT},
    }
    deploy(ServeConfig.parse({"models": [{"name": MODEL, "revisions": [revision]}]}))
    warm = torch.randint(3, vocab, (8, 40), generator=torch.Generator().manual_seed(99)).tolist()
    asyncio.run(send_all(url, warm))
    engines = serve.get_deployment_handle(engine_deployment_name(MODEL, "v1"), revision_app_name(MODEL, "v1"))
    before = [r["prefix_cache"] for r in engines.broadcast("info").results()]
    seconds, ttft, tokens = asyncio.run(send_all(url, prompts))
    after = [r["prefix_cache"] for r in engines.broadcast("info").results()]
    hit_ratios = [
        (a["hits"] - b["hits"]) / max(1, a["queries"] - b["queries"])
        for a, b in zip(after, before, strict=True)
    ]
    return {"tokens_per_s": tokens / seconds, "ttft": ttft, "hit_ratios": hit_ratios}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    vocab = small_checkpoint("qwen2_moe")[1]
    prompts = workload(vocab)
    print(f"CPU: {cpu_model()}; checkpoint {CHECKPOINT.name}; 2 engine replicas x 1 thread")
    print(
        f"workload: {REQUESTS} requests, {PREFIXES} {PREFIX_LEN}-token prefixes in turn + {OWN_LEN} own tokens, "
        f"{NEW_TOKENS} new tokens, greedy, {IN_FLIGHT} in flight"
    )
    runs = {}
    with local_serve() as (url, _):
        for routing in ("prefix_aware", "least_loaded"):
            runs[routing] = run = run_mode(url, routing, prompts, vocab)
            q = statistics.quantiles(run["ttft"], n=10, method="inclusive")
            print(
                f"{routing:13s} {run['tokens_per_s']:7.1f} output tokens/s; TTFT p50 {statistics.median(run['ttft']):.2f} s, "
                f"p90 {q[8]:.2f} s; replica hit ratios {', '.join(f'{h:.2f}' for h in run['hit_ratios'])}"
            )
    ratio = runs["prefix_aware"]["tokens_per_s"] / runs["least_loaded"]["tokens_per_s"]
    print(f"ratio prefix-aware/default-routing = {ratio:.2f}")


if __name__ == "__main__":
    main()
