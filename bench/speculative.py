"""Speculative decoding with n-gram proposals against plain decoding, same engine, same weights.

Workload (fixed): the `small` qwen2_moe checkpoint, fp32, 4 prompts of 256 token ids that repeat
a 32-token unit (text that quotes or continues itself: code, structured output, a template),
128 new tokens each, greedy, EOS ignored; speculation proposes up to 4 tokens per sequence and
step. A random-weight model also loops on its own output, and prompt lookup finds those loops
too: that counts here, as it would for a real model that repeats itself, but a trained model's
acceptance on real text is what decides its speed. Prints the CPU, output tokens/s for both, the
acceptance rate, whether the tokens are identical, then `ratio speculative/plain`.

    .venv/bin/python bench/speculative.py
"""

from __future__ import annotations

import os
import time

import torch
from small_checkpoint import CHECKPOINTS, small_checkpoint

from expertmesh import LLM, SamplingParams
from expertmesh.kernels.isa import cpu_model

CHECKPOINT = CHECKPOINTS / "qwen2_moe-small"
NUM_PROMPTS, PROMPT_LEN, UNIT, NEW_TOKENS, PROPOSE = 4, 256, 32, 128, 4


def workload(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    units = torch.randint(3, vocab, (NUM_PROMPTS, UNIT), generator=gen).tolist()
    return [(unit * (PROMPT_LEN // UNIT))[:PROMPT_LEN] for unit in units]


def run(prompts: list[list[int]], speculative: dict | None) -> dict:
    llm = LLM(
        CHECKPOINT,
        "float32",
        skip_tokenizer_init=True,
        show_progress=False,
        max_num_seqs=NUM_PROMPTS,
        enable_prefix_caching=False,  # the warm-up shares nothing with the workload either way
        speculative=speculative,
    )
    warm = [p[::-1][:40] for p in prompts]
    llm.generate(warm, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    before = engine.speculative_stats()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = engine.speculative_stats()
    proposed = stats["proposed"] - before["proposed"]
    accepted = stats["accepted"] - before["accepted"]
    tokens = [o.outputs[0].token_ids for o in outs]
    return {
        "tokens_per_s": sum(len(t) for t in tokens) / elapsed,
        "acceptance": accepted / proposed if proposed else 0.0,
        "proposed": proposed,
        "outputs": tokens,
    }


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    prompts = workload(small_checkpoint("qwen2_moe")[1])
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; checkpoint {CHECKPOINT.name}")
    print(
        f"workload: {NUM_PROMPTS} prompts of {PROMPT_LEN} tokens repeating a {UNIT}-token unit, "
        f"{NEW_TOKENS} new tokens each, greedy; n-gram proposals of up to {PROPOSE} tokens"
    )
    spec = run(prompts, {"method": "ngram", "num_tokens": PROPOSE})
    plain = run(prompts, None)
    print(f"speculative (ngram): {spec['tokens_per_s']:8.1f} output tokens/s")
    print(f"plain decoding:      {plain['tokens_per_s']:8.1f} output tokens/s")
    print(f"acceptance rate: {spec['acceptance']:.2f} ({spec['proposed']} tokens proposed)")
    print(
        f"identical: {str(spec['outputs'] == plain['outputs']).lower()} (greedy tokens, speculative vs plain)"
    )
    print(f"ratio speculative/plain = {spec['tokens_per_s'] / plain['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
