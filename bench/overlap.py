"""Does the ping-pong overlap pay? Disaggregated experts, two micro-batches against one.

Workload: the `small` pangu_pro_moe checkpoint (MoGE, 8 groups), all prompts at
once, greedy, EOS ignored. The expert groups run as real Ray Serve ExpertGroup
replicas (one process per group, ZeroMQ data path); the engine runs in this
process with a RemoteExpertBackend, once with `micro_batches: 1` (each layer
waits for its experts) and once with `micro_batches: 2` (while one half's rows
are with the pools, the other half's attention, router and shared expert run).
Both use the same pools and the same model; runs alternate, the median counts.
Prints output tokens/s of each, then `ratio overlap/sequential` (throughput;
above 1: the overlap pays).

    .venv/bin/python bench/overlap.py [--prompts 32] [--engine-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray
import torch
from ray import serve

from expertmesh.config import ExpertParallelSpec, RevisionSpec
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.checkpoint_maker import make_checkpoint
from expertmesh.model.loader import load_config, load_model
from expertmesh.model.tokenizer_files import load_tokenizer, stop_token_ids
from expertmesh.serve.deployments import ExpertGroup, partition_for
from expertmesh.serve.remote_experts import RemoteExpertBackend

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "pangu_pro_moe-small"


def run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    elapsed = time.perf_counter() - start
    tokens = [done[i] for i in ids]
    return sum(map(len, tokens)) / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--engine-threads", type=int, default=1, help="torch threads of the engine")
    parser.add_argument(
        "--min-tokens", type=int, default=16, help="micro_batch_min_tokens of the overlapped run"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.engine_threads)
    if not (CHECKPOINT / "config.json").is_file():
        make_checkpoint("pangu_pro_moe", "small", CHECKPOINT)
    cfg = load_config(CHECKPOINT)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (args.prompts, args.prompt_len), generator=gen).tolist()
    spec = RevisionSpec(
        source=str(CHECKPOINT), dtype="float32", expert_parallel=ExpertParallelSpec(enabled=True)
    )
    partition = partition_for(spec)
    print(
        f"workload: {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"greedy; {CHECKPOINT.name}, {partition.num_groups} expert pools x 1 replica; "
        f"engine threads {args.engine_threads}"
    )

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        revision = spec.model_dump(mode="json")
        endpoints = {}
        for group in range(partition.num_groups):
            handle = serve.run(
                ExpertGroup.options(name=f"overlap-bench-g{group}").bind(revision, group, "bench"),
                name=f"overlap-bench-g{group}",
                route_prefix=None,
            )
            endpoints[group] = [handle.endpoint.remote().result()]
        model = load_model(CHECKPOINT, "float32", load_experts=False)
        backend = RemoteExpertBackend(partition, endpoints)
        model.set_expert_backend(backend)
        tokenizer, eos = load_tokenizer(CHECKPOINT), stop_token_ids(CHECKPOINT, cfg.eos_token_ids)
        engines = {
            mode: LLMEngine(
                model,
                tokenizer,
                eos,
                EngineConfig(
                    max_num_seqs=args.prompts,
                    max_num_batched_tokens=max(1024, args.prompts),
                    micro_batches=micro_batches,
                    micro_batch_min_tokens=args.min_tokens,
                    # the rounds repeat the prompts: cached, they would prefill nothing
                    enable_prefix_caching=False,
                ),
            )
            for mode, micro_batches in (("sequential", 1), ("overlap", 2))
        }
        for engine in engines.values():
            run(engine, prompts[:4], 4)  # warm-up
        rates: dict[str, list[float]] = {mode: [] for mode in engines}
        outputs = {}
        for _ in range(args.repeats):
            for mode, engine in engines.items():
                rate, outputs[mode] = run(engine, prompts, args.new_tokens)
                rates[mode].append(rate)
        backend.close()
        serve.shutdown()
    finally:
        ray.shutdown()

    same = outputs["overlap"] == outputs["sequential"]
    print(f"greedy tokens identical in both modes: {same}")
    for mode, samples in rates.items():
        spread = ", ".join(f"{r:.1f}" for r in samples)
        print(f"{mode:<11} {statistics.median(samples):8.1f} output tokens/s  (runs: {spread})")
    ratio = statistics.median(rates["overlap"]) / statistics.median(rates["sequential"])
    print(f"ratio overlap/sequential = {ratio:.2f}")


if __name__ == "__main__":
    main()
