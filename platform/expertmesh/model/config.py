"""Model configuration: one pydantic model for every family, read from an HF `config.json`.

Each family's config keys differ (Mixtral's `num_local_experts`, transformers v5's
`rope_parameters`, Pangu's `router_scale`); `ModelConfig.from_hf` folds them into one
shape so the rest of the runtime never looks at raw keys again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from expertmesh.errors import CheckpointError, describe_validation_error
from expertmesh.model.rope import YarnScaling

Family = Literal["llama", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral", "pangu_pro_moe", "pangu_embedded"]

# `architectures[0]` (or `model_type`) -> family. Pangu ships under several spellings.
_FAMILY_BY_NAME: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "llama": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "qwen2": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "qwen2_moe": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "qwen3_moe": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "mixtral": "mixtral",
    "PanguProMoEForCausalLM": "pangu_pro_moe",
    "PanguProMoE": "pangu_pro_moe",
    "pangu_pro_moe": "pangu_pro_moe",
    # openPangu-Embedded (the release's dense "Pangu 7B"): Llama with biases on q, k, v and o
    "PanguEmbeddedForCausalLM": "pangu_embedded",
    "PanguEmbedded": "pangu_embedded",
}
SUPPORTED_ARCHITECTURES = sorted(k for k in _FAMILY_BY_NAME if k[0].isupper())


class MoEConfig(BaseModel):
    """How a sparse MLP layer routes and what it holds."""

    model_config = ConfigDict(frozen=True)

    routing: Literal["topk", "moge"]
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(H, 1)) scales the shared expert
    router_scale: bool = False  # Pangu: learned per-expert multiplier on the routing weight

    @model_validator(mode="after")
    def _check_groups(self) -> MoEConfig:
        if self.routing == "moge" and self.num_experts % self.num_experts_per_tok:
            raise ValueError(
                f"MoGE needs num_experts ({self.num_experts}) divisible by "
                f"num_experts_per_tok ({self.num_experts_per_tok}), the number of groups"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        return self

    @property
    def num_routing_groups(self) -> int:
        """MoGE groups (one expert chosen per group); top-k has no routing groups."""
        return self.num_experts_per_tok if self.routing == "moge" else 1


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0  # dense MLP width (dense models and dense layers of MoE models)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    moe: MoEConfig | None = None
    moe_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        try:
            return _from_hf(raw, source)
        except ValidationError as exc:
            raise CheckpointError(f"{source}: {describe_validation_error(exc, 'config value')}") from None


def _family_of(raw: dict[str, Any], source: str) -> Family:
    names = list(raw.get("architectures") or []) + [raw.get("model_type")]
    for name in names:
        if name in _FAMILY_BY_NAME:
            return _FAMILY_BY_NAME[name]
    raise CheckpointError(
        f"{source}: unknown architecture {names[0] if names[0] else raw.get('model_type')!r} "
        f"(keys 'architectures'/'model_type'); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_spec(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The RoPE settings: transformers v5 writes `rope_parameters`, hub checkpoints
    `rope_theta` and `rope_scaling`. Default RoPE and YaRN are supported."""
    for key in ("rope_parameters", "rope_scaling"):
        spec = raw.get(key) or {}
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", None, "yarn"):
            raise CheckpointError(
                f"{source}: {key} has rope type {kind!r}, which is not supported (supported: 'default', 'yarn')"
            )
        if kind == "yarn":
            return spec
    return {}


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    params = raw.get("rope_parameters") or {}
    _rope_spec(raw, source)  # an unsupported type fails here, with the file named
    return float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))


def _yarn(raw: dict[str, Any], source: str) -> YarnScaling | None:
    spec = _rope_spec(raw, source)
    if not spec:
        return None
    fields = {k: v for k, v in spec.items() if k in YarnScaling.model_fields and v is not None}
    if "factor" not in fields and "original_max_position_embeddings" in fields:  # DeepSeek-style: the ratio
        fields["factor"] = raw["max_position_embeddings"] / fields["original_max_position_embeddings"]
    return YarnScaling(**fields)


def _attention_bias(family: Family, raw: dict[str, Any]) -> bool:
    """Whether q, k, v (and for Llama-style families o) carry biases: openPangu-Embedded's config
    switches them with `bias`, the others with `attention_bias`."""
    return bool(raw.get("bias" if family == "pangu_embedded" else "attention_bias"))


def _from_hf(raw: dict[str, Any], source: str) -> ModelConfig:
    family = _family_of(raw, source)

    def need(key: str, *aliases: str) -> Any:
        for name in (key, *aliases):
            if raw.get(name) is not None:
                return raw[name]
        raise CheckpointError(f"{source}: missing key {key!r} (required for {family})")

    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    moe: MoEConfig | None = None
    moe_layers: tuple[int, ...] = ()
    if family in ("qwen2_moe", "qwen3_moe", "pangu_pro_moe"):
        moe = MoEConfig(
            routing="moge" if family == "pangu_pro_moe" else "topk",
            num_experts=need("num_experts", "num_local_experts"),  # transformers v5 renamed it
            num_experts_per_tok=need("num_experts_per_tok"),
            moe_intermediate_size=need("moe_intermediate_size"),
            norm_topk_prob=bool(raw.get("norm_topk_prob", family == "qwen3_moe")),
            shared_expert_intermediate_size=(
                need("shared_expert_intermediate_size") if family != "qwen3_moe" else 0
            ),
            shared_expert_gate=family == "qwen2_moe",
            router_scale=family == "pangu_pro_moe",
        )
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    elif family == "mixtral":
        moe = MoEConfig(
            routing="topk",
            num_experts=need("num_local_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            moe_intermediate_size=need("intermediate_size"),
            norm_topk_prob=True,
        )
        moe_layers = tuple(range(layers))
    if len(moe_layers) < layers:
        need("intermediate_size")  # some layer is dense

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        intermediate_size=raw.get("intermediate_size") or 0,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw, source),
        rope_scaling=_yarn(raw, source),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family in ("qwen2", "qwen2_moe", "pangu_pro_moe") or _attention_bias(family, raw),
        o_bias=family == "pangu_pro_moe"
        or (family in ("llama", "pangu_embedded") and _attention_bias(family, raw)),
        qk_norm=family == "qwen3_moe",
        moe=moe,
        moe_layers=moe_layers,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )
