"""Serving overhead and expert-parallel cost, measured in one run on one machine.

Workload: the `small` pangu_pro_moe checkpoint (MoGE, 8 groups), 16 prompts x 64
random tokens, 32 new tokens each, greedy, EOS ignored, all requests at once.

- `served/in-process`: the same workload over gRPC (`expertmesh.v1.Generation`
  streaming Generate) through Ray Serve's proxy (proxy -> router -> engine),
  against the in-process `LLM` engine; `served-http/in-process` the same over
  the OpenAI HTTP API.
- `disaggregated/colocated`: served with one Serve pool per expert group
  (ZeroMQ data path) against served with experts inside the engine.
- `moge-group-imbalance`: max/mean of the rows each expert group received over
  the in-process run (MoGE makes it exactly 1).

    .venv/bin/python bench/serving.py
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import ray
import torch
from ray import serve

from expertmesh import LLM, SamplingParams
from expertmesh.config import ServeConfig
from expertmesh.model.checkpoint_maker import make_checkpoint
from expertmesh.model.experts import ColocatedExpertBackend, ExpertBatch, ExpertPartition
from expertmesh.serve.app import deploy, grpc_options

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "pangu_pro_moe-small"
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 64, 32


class CountingBackend(ColocatedExpertBackend):
    """The colocated backend, also counting rows per expert group (for the imbalance figure)."""

    def __init__(self, inner: ColocatedExpertBackend, partition: ExpertPartition):
        super().__init__(inner.layers)
        self.partition = partition
        self.rows_per_group = [0] * partition.num_groups

    def run(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        for group in range(self.partition.num_groups):
            self.rows_per_group[group] += batch.for_group(self.partition, group).num_rows
        return super().run(layer, batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_process(prompts: list[list[int]]) -> tuple[float, float]:
    llm = LLM(CHECKPOINT, "float32", show_progress=False)
    model = llm.engine.model
    moe = model.config.moe
    counting = CountingBackend(
        model.moe_blocks[0].backend, ExpertPartition(moe.num_experts, moe.num_routing_groups)
    )
    model.set_expert_backend(counting)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)  # warm-up
    counting.rows_per_group = [0] * len(counting.rows_per_group)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    rows = counting.rows_per_group
    return sum(o.num_output_tokens for o in outs) / elapsed, max(rows) / (sum(rows) / len(rows))


async def run_served_grpc(target: str, model: str, prompts: list[list[int]]) -> float:
    import grpc

    from expertmesh.api.pb import generation_pb2 as gen
    from expertmesh.api.pb import generation_pb2_grpc as gen_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        sampling = gen.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

        async def one(prompt: list[int]) -> int:
            request = gen.GenerateRequest(model=model, token_ids=gen.TokenIds(ids=prompt), sampling=sampling)
            tokens = 0
            async for message in stub.Generate(request):
                if message.HasField("delta"):
                    tokens += len(message.delta.token_ids)
            return tokens

        await one(prompts[0][:8])  # warm-up
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        return tokens / (time.perf_counter() - start)


async def run_served(base_url: str, model: str, prompts: list[list[int]]) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    body = dict(max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    await client.completions.create(model=model, prompt=prompts[0][:8], max_tokens=2)  # warm-up
    start = time.perf_counter()
    replies = await asyncio.gather(
        *(client.completions.create(model=model, prompt=p, **body) for p in prompts)
    )
    elapsed = time.perf_counter() - start
    return sum(r.usage.completion_tokens for r in replies) / elapsed


def main() -> None:
    torch.set_num_threads(2)
    if not (CHECKPOINT / "config.json").is_file():
        make_checkpoint("pangu_pro_moe", "small", CHECKPOINT)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 16000, (NUM_PROMPTS, PROMPT_LEN), generator=gen).tolist()
    print(
        f"workload: {NUM_PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, greedy; {CHECKPOINT.name}"
    )

    in_process, imbalance = run_in_process(prompts)
    print(f"in-process engine:        {in_process:8.1f} output tokens/s")

    port, grpc_port = free_port(), free_port()
    revision = {"source": str(CHECKPOINT), "dtype": "float32", "engine_threads": 2}  # as in-process
    config = ServeConfig.parse(
        {
            "models": [
                {"name": "colocated", "revisions": [revision]},
                {"name": "disaggregated", "revisions": [revision | {"expert_parallel": {"enabled": True}}]},
            ]
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=grpc_options(grpc_port))
        deploy(config)
        url = f"http://127.0.0.1:{port}"
        colocated_grpc = asyncio.run(run_served_grpc(f"127.0.0.1:{grpc_port}", "colocated", prompts))
        print(
            f"served, colocated, gRPC:  {colocated_grpc:8.1f} output tokens/s (streaming Generate through Ray Serve)"
        )
        colocated = asyncio.run(run_served(url, "colocated", prompts))
        print(f"served, colocated, HTTP:  {colocated:8.1f} output tokens/s (OpenAI API through Ray Serve)")
        disaggregated = asyncio.run(run_served(url, "disaggregated", prompts))
        print(
            f"served, disaggregated, HTTP: {disaggregated:5.1f} output tokens/s (8 expert pools over ZeroMQ)"
        )
        serve.shutdown()
    finally:
        ray.shutdown()
    print(f"ratio served-http/in-process = {colocated / in_process:.2f}")
    print(f"ratio served/in-process = {colocated_grpc / in_process:.2f}")
    print(f"ratio disaggregated/colocated = {disaggregated / colocated:.2f}")
    print(f"ratio moge-group-imbalance = {imbalance:.2f}")


if __name__ == "__main__":
    main()
