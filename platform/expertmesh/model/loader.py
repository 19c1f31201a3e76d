"""Load HF checkpoints (config.json + safetensors, single or sharded) into our model.

Tensors are read one key at a time through `safe_open`, so loading one expert
group's weights never reads another group's bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from expertmesh.errors import CheckpointError
from expertmesh.model.attention import Attention
from expertmesh.model.config import MLAConfig, ModelConfig
from expertmesh.model.experts import ColocatedExpertBackend, ExpertPartition, ExpertWeights
from expertmesh.model.layers import GatedMLP, RotaryEmbedding
from expertmesh.model.mla import MultiHeadLatentAttention
from expertmesh.model.moe import SparseMoE
from expertmesh.model.transformer import CausalLM
from expertmesh.model.weight_names import (
    Shape,
    attention_tensors,
    expert_tensors,
    mla_tensors,
    mlp_tensors,
    moe_prefix,
    shared_expert_prefix,
)

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_READABLE = {torch.float32, torch.bfloat16, torch.float16}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig) -> torch.dtype:
    """'auto' follows the checkpoint (bf16 stays bf16, anything else runs in fp32)."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = cfg.torch_dtype if dtype == "auto" else dtype
        if dtype == "auto" and name not in DTYPES:
            name = "float32"
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class TensorStore:
    """Lazy, checked access to the tensors of a checkpoint directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._handles: dict[str, object] = {}
        self.keys_read: list[str] = []  # every key read, in order: tests use it to prove laziness
        index = directory / INDEX_FILE
        single = directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from exc
            self._file_of = {key: directory / name for key, name in weight_map.items()}
        elif single.is_file():
            self._file_of = {key: single for key in self._open(single).keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def _open(self, file: Path):
        if str(file) not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: missing safetensors file (named in {INDEX_FILE})")
            try:
                self._handles[str(file)] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{file}: corrupted safetensors file ({exc})") from exc
        return self._handles[str(file)]

    def has(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        if key not in self._file_of:
            raise CheckpointError(f"{self.directory}: tensor {key!r} not found in the checkpoint")
        file = self._file_of[key]
        handle = self._open(file)
        try:
            tensor = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({exc})") from exc
        self.keys_read.append(key)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {list(tensor.shape)}, config.json implies {list(shape)}"
            )
        if tensor.dtype not in _READABLE:
            raise CheckpointError(
                f"{file}: tensor {key!r} has unsupported dtype {tensor.dtype} "
                "(supported: float32, bfloat16, float16)"
            )
        return tensor.to(dtype)


def load_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    return ModelConfig.from_file(directory / "config.json")


def load_expert_weights(
    store: TensorStore, cfg: ModelConfig, layer: int, experts: Iterable[int], dtype: torch.dtype
) -> ExpertWeights:
    """Stack the given experts of one layer into [E, H, 2I] / [E, I, H] tensors."""
    experts = list(experts)
    hidden, inter = cfg.hidden_size, cfg.moe.moe_intermediate_size
    gate_up = torch.empty(len(experts), hidden, 2 * inter, dtype=dtype)
    down = torch.empty(len(experts), inter, hidden, dtype=dtype)
    for slot, expert in enumerate(experts):
        names = expert_tensors(cfg, layer, expert)
        gate_up[slot, :, :inter] = store.get(*names["gate"], dtype).t()
        gate_up[slot, :, inter:] = store.get(*names["up"], dtype).t()
        down[slot] = store.get(*names["down"], dtype).t()
    return ExpertWeights(gate_up, down)


def load_expert_group(
    directory: str | Path, group: int, num_groups: int, dtype: str | torch.dtype = "auto"
) -> dict[int, ExpertWeights]:
    """One expert group's weights for every MoE layer: what one expert-pool replica holds."""
    directory = Path(directory)
    cfg = load_config(directory)
    if cfg.moe is None:
        raise CheckpointError(f"{directory}: {cfg.family} is a dense model; it has no expert groups")
    partition = ExpertPartition(cfg.moe.num_experts, num_groups)
    if not 0 <= group < num_groups:
        raise CheckpointError(f"expert group {group} out of range [0, {num_groups})")
    store = TensorStore(directory)
    torch_dtype = resolve_dtype(dtype, cfg)
    return {
        layer: load_expert_weights(store, cfg, layer, partition.experts_of(group), torch_dtype)
        for layer in cfg.moe_layers
    }


def _fill(param: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Copy checkpoint tensors into a parameter, concatenating fused ones (q|k|v, gate|up)."""
    if len(parts) > 1:
        torch.cat(parts, dim=0, out=param.data)
    else:
        param.data.copy_(parts[0])


def load_model(
    directory: str | Path,
    dtype: str | torch.dtype = "auto",
    *,
    load_experts: bool = True,
    progress=None,
) -> CausalLM:
    """Build the model from a checkpoint. With `load_experts`, experts run colocated.

    `progress`, when given, is called with (done, total) after each layer.
    """
    directory = Path(directory)
    cfg = load_config(directory)
    torch_dtype = resolve_dtype(dtype, cfg)
    store = TensorStore(directory)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to(torch_dtype).to_empty(device="cpu").eval().requires_grad_(False)
    model.rotary = RotaryEmbedding.of(cfg)

    def get(spec: tuple[str, Shape], dtype: torch.dtype = torch_dtype) -> torch.Tensor:
        return store.get(*spec, dtype)

    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    _fill(model.embed_tokens.weight, [get(("model.embed_tokens.weight", (vocab, hidden)))])
    _fill(model.norm.weight, [get(("model.norm.weight", (hidden,)))])
    if cfg.tie_word_embeddings and not store.has("lm_head.weight"):
        model.lm_head.weight = model.embed_tokens.weight
    else:
        _fill(model.lm_head.weight, [get(("lm_head.weight", (vocab, hidden)))])

    experts: dict[int, ExpertWeights] = {}
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        _fill(layer.input_layernorm.weight, [get((f"{prefix}.input_layernorm.weight", (hidden,)))])
        _fill(
            layer.post_attention_layernorm.weight,
            [get((f"{prefix}.post_attention_layernorm.weight", (hidden,)))],
        )
        if cfg.sandwich_norm:
            _fill(layer.pre_mlp_layernorm.weight, [get((f"{prefix}.pre_mlp_layernorm.weight", (hidden,)))])
            _fill(layer.post_mlp_layernorm.weight, [get((f"{prefix}.post_mlp_layernorm.weight", (hidden,)))])
        if cfg.mla is not None:
            _load_mla(layer.self_attn, cfg.mla, mla_tensors(cfg, i), get)
        else:
            _load_attention(layer.self_attn, attention_tensors(cfg, i), get)
        if isinstance(layer.mlp, SparseMoE):
            _load_sparse(layer.mlp, cfg, i, get, store)
            if load_experts:
                experts[i] = load_expert_weights(store, cfg, i, range(cfg.moe.num_experts), torch_dtype)
        else:
            _load_mlp(layer.mlp, mlp_tensors(f"{prefix}.mlp", hidden, cfg.intermediate_size), get)
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    if cfg.num_mtp_layers:
        log.info(
            "%s: %d multi-token-prediction layer(s) (model.layers.%d.*) left on disk: "
            "the engine decodes one token a step",
            directory,
            cfg.num_mtp_layers,
            cfg.num_layers,
        )
    if load_experts and experts:
        model.set_expert_backend(ColocatedExpertBackend(experts))
    return model


def _load_attention(attn: Attention, names, get) -> None:
    _fill(attn.qkv_proj.weight, [get(names["q"]), get(names["k"]), get(names["v"])])
    if "q_bias" in names:
        _fill(attn.qkv_proj.bias, [get(names["q_bias"]), get(names["k_bias"]), get(names["v_bias"])])
    _fill(attn.o_proj.weight, [get(names["o"])])
    if "o_bias" in names:
        _fill(attn.o_proj.bias, [get(names["o_bias"])])
    if "q_norm" in names:
        _fill(attn.q_norm.weight, [get(names["q_norm"])])
        _fill(attn.k_norm.weight, [get(names["k_norm"])])


def _load_mla(attn: MultiHeadLatentAttention, mla: MLAConfig, names, get) -> None:
    query = [get(names["q_a"])] if "q_a" in names else [_deinterleave_query(get(names["q"]), mla)]
    _fill(attn.qkv_a_proj.weight, [*query, _deinterleave_rows(get(names["kv_a"]), mla.kv_lora_rank, mla)])
    if attn.q_b_proj is not None:
        _fill(attn.q_a_layernorm.weight, [get(names["q_a_norm"])])
        _fill(attn.q_b_proj.weight, [_deinterleave_query(get(names["q_b"]), mla)])
    _fill(attn.kv_a_layernorm.weight, [get(names["kv_a_norm"])])
    _fill(attn.kv_b_proj.weight, [get(names["kv_b"])])
    _fill(attn.o_proj.weight, [get(names["o"])])


def _deinterleave_rows(weight: torch.Tensor, start: int, mla: MLAConfig) -> torch.Tensor:
    """Rows [start, start + rope) of a projection reordered evens first, then odds: interleaved RoPE
    on the old order is rotate-half RoPE on the new one, and q and k reordered alike keep their dot products."""
    if not mla.rope_interleave:
        return weight
    rope = torch.arange(mla.qk_rope_head_dim)
    order = torch.cat([torch.arange(start), start + torch.cat([rope[0::2], rope[1::2]])])
    return weight[order]


def _deinterleave_query(weight: torch.Tensor, mla: MLAConfig) -> torch.Tensor:
    """Each head's rope rows of a query projection [heads * (nope + rope), in], reordered."""
    heads = weight.view(-1, mla.qk_head_dim, weight.shape[-1])
    return torch.stack([_deinterleave_rows(h, mla.qk_nope_head_dim, mla) for h in heads]).view_as(weight)


def _load_mlp(mlp: GatedMLP, names, get) -> None:
    _fill(mlp.gate_up_proj.weight, [get(names["gate"]), get(names["up"])])
    _fill(mlp.down_proj.weight, [get(names["down"])])


def _load_sparse(block: SparseMoE, cfg: ModelConfig, layer: int, get, store: TensorStore) -> None:
    moe, prefix = cfg.moe, moe_prefix(cfg, layer)
    _fill(block.gate.weight, [get((f"{prefix}.gate.weight", (moe.num_experts, cfg.hidden_size)))])
    if block.e_score_correction_bias is not None and moe.expert_bias:  # fp32 whatever the model's dtype
        key = f"{prefix}.gate.e_score_correction_bias"
        if not store.has(key) and store.has(f"{prefix}.e_score_correction_bias"):
            key = f"{prefix}.e_score_correction_bias"  # where vLLM's openPangu loader also looks
        bias = get((key, (moe.num_experts,)), torch.float32)
        block.e_score_correction_bias = torch.nn.Parameter(bias, requires_grad=False)
    elif block.e_score_correction_bias is not None:  # no bias in the checkpoint: choose on the scores
        block.e_score_correction_bias = torch.nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)
    if block.router_scale is not None:
        _fill(block.router_scale, [get((f"{prefix}.router_scale", (1, moe.num_experts)))])
    if block.shared_expert is not None:
        names = mlp_tensors(
            shared_expert_prefix(cfg, layer), cfg.hidden_size, moe.shared_expert_intermediate_size
        )
        _load_mlp(block.shared_expert, names, get)
    if block.shared_expert_gate is not None:
        _fill(
            block.shared_expert_gate.weight,
            [get((f"{prefix}.shared_expert_gate.weight", (1, cfg.hidden_size)))],
        )
