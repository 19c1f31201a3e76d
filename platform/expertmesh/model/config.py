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
from expertmesh.model.rope_scaling import YarnScaling, yarn_mscale

Family = Literal[
    "llama",
    "qwen2",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "pangu_pro_moe",
    "pangu_embedded",
    "deepseek_v3",
    "pangu_ultra_moe",
]
# The DeepSeek-V3 architecture: MLA attention, sigmoid routing with a choosing-only bias, MTP layers.
MLA_FAMILIES = ("deepseek_v3", "pangu_ultra_moe")

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
    # DeepSeek-V3/R1 and Kimi K2: MLA attention, group-limited sigmoid routing, MTP layers
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "deepseek_v3": "deepseek_v3",
    # openPangu-Ultra-MoE: DeepSeek-V3's architecture with sandwich norms around the MLP
    "PanguUltraMoEForCausalLM": "pangu_ultra_moe",
    "pangu_ultra_moe": "pangu_ultra_moe",
}
SUPPORTED_ARCHITECTURES = sorted(k for k in _FAMILY_BY_NAME if k[0].isupper())


class MoEConfig(BaseModel):
    """How a sparse MLP layer routes and what it holds."""

    model_config = ConfigDict(frozen=True)

    routing: Literal["topk", "moge", "noaux_tc"]
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(H, 1)) scales the shared expert
    router_scale: bool = False  # Pangu: learned per-expert multiplier on the routing weight
    # noaux_tc (DeepSeek-V3): experts in `num_groups` groups, each token keeping `topk_group` of them,
    # chosen with a per-expert bias when the checkpoint has one (`expert_bias`)
    expert_bias: bool = True
    num_groups: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @model_validator(mode="after")
    def _check_groups(self) -> MoEConfig:
        if self.routing == "moge" and self.num_experts % self.num_experts_per_tok:
            raise ValueError(
                f"MoGE needs num_experts ({self.num_experts}) divisible by "
                f"num_experts_per_tok ({self.num_experts_per_tok}), the number of groups"
            )
        if self.routing == "noaux_tc":
            if self.num_experts % self.num_groups:
                raise ValueError(
                    f"n_group ({self.num_groups}) must divide n_routed_experts ({self.num_experts})"
                )
            if not 1 <= self.topk_group <= self.num_groups:
                raise ValueError(
                    f"topk_group must be in [1, n_group={self.num_groups}], got {self.topk_group}"
                )
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.num_groups):
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in "
                    f"topk_group={self.topk_group} groups of {self.num_experts // self.num_groups}"
                )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        return self

    @property
    def num_routing_groups(self) -> int:
        """MoGE groups (one expert chosen per group), noaux_tc's `n_group` (each token reaching at
        most `topk_group` of them); plain top-k has no routing groups."""
        if self.routing == "moge":
            return self.num_experts_per_tok
        return self.num_groups if self.routing == "noaux_tc" else 1

    @property
    def routing_groups(self) -> int | None:
        """The groups routing defines, which make the natural expert pools: MoGE's (each token
        reaches every one, once) and noaux_tc's (each token reaches at most topk_group); None
        when routing has no groups."""
        return self.num_routing_groups if self.num_routing_groups > 1 else None


class MLAConfig(BaseModel):
    """Multi-head latent attention (DeepSeek-V2/V3): K and V come from a `kv_lora_rank` latent per
    token, which with a shared `qk_rope_head_dim` rotary key is all the cache keeps."""

    model_config = ConfigDict(frozen=True)

    q_lora_rank: int | None  # None: one q_proj, no low-rank query
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    latent_norm_eps: float = 1e-6  # DeepSeek's code builds the latent norms with the default eps
    # The released weights rotate adjacent pairs (x0, x1), (x2, x3)...; the loader reorders the
    # rope rows so the usual rotate-half RoPE gives the same dot products.
    rope_interleave: bool = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent and the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


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
    mla: MLAConfig | None = None
    # openPangu: the attention output and the MLP output are normed before each joins the residual
    sandwich_norm: bool = False
    num_mtp_layers: int = 0  # multi-token-prediction layers stored after the last layer
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

    @property
    def rotary_dim(self) -> int:
        """Dimensions RoPE turns per head: MLA rotates only its rope part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_values_per_token(self) -> int:
        """Cached values per token and layer: K and V of every KV head, or MLA's latent and rope key."""
        return self.mla.cache_width if self.mla is not None else 2 * self.num_kv_heads * self.head_dim

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


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
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
    elif family in MLA_FAMILIES:
        moe, moe_layers = _deepseek_moe(family, raw, source, need, layers)
    if len(moe_layers) < layers:
        need("intermediate_size")  # some layer is dense
    rope_scaling = _yarn(raw, source)  # an unsupported rope type fails here, with the file named
    mla = _mla(family, raw, source, need, rope_scaling) if family in MLA_FAMILIES else None

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        # transformers writes MLA's rope width as `head_dim`; a query head is nope + rope wide
        head_dim=mla.qk_head_dim if mla is not None else raw.get("head_dim") or hidden // heads,
        intermediate_size=raw.get("intermediate_size") or 0,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family in ("qwen2", "qwen2_moe", "pangu_pro_moe") or _attention_bias(family, raw),
        o_bias=family == "pangu_pro_moe"
        or (family in ("llama", "pangu_embedded") and _attention_bias(family, raw)),
        qk_norm=family == "qwen3_moe",
        moe=moe,
        moe_layers=moe_layers,
        mla=mla,
        sandwich_norm=bool(raw.get("sandwich_norm", False)),
        num_mtp_layers=int(raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )


def _refuse_unless(raw: dict[str, Any], source: str, key: str, supported: tuple, default: Any) -> None:
    """A config feature we do not implement fails at load, naming the key, its value and what works."""
    value = raw.get(key, default)
    if value not in supported:
        raise CheckpointError(
            f"{source}: {key}={value!r} is not supported (supported: {', '.join(repr(v) for v in supported)})"
        )


def _deepseek_moe(
    family: Family, raw: dict[str, Any], source: str, need, layers: int
) -> tuple[MoEConfig, tuple[int, ...]]:
    """DeepSeek-V3's sparse layers: every `moe_layer_freq`-th layer from `first_k_dense_replace` on,
    routed by `noaux_tc` with `n_shared_experts` fused into one shared MLP. openPangu-Ultra-MoE
    routes over all experts as one group (vLLM's openpangu.py fixes n_group = topk_group = 1)
    and has the choosing-only bias when `router_enable_expert_bias`."""
    ultra = family == "pangu_ultra_moe"
    _refuse_unless(raw, source, "topk_method", ("noaux_tc",), "noaux_tc")
    _refuse_unless(raw, source, "scoring_func", ("sigmoid",), "sigmoid")
    _refuse_unless(raw, source, "hidden_act", ("silu",), "silu")
    inter = need("moe_intermediate_size")
    moe = MoEConfig(
        routing="noaux_tc",
        num_experts=need("n_routed_experts", "num_local_experts"),
        num_experts_per_tok=need("num_experts_per_tok"),
        moe_intermediate_size=inter,
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        shared_expert_intermediate_size=inter * int(raw.get("n_shared_experts") or 0),
        expert_bias=bool(raw.get("router_enable_expert_bias")) if ultra else True,
        num_groups=1 if ultra else int(raw.get("n_group") or 1),
        topk_group=1 if ultra else int(raw.get("topk_group") or 1),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
    )
    first_sparse, every = int(raw.get("first_k_dense_replace") or 0), int(raw.get("moe_layer_freq") or 1)
    return moe, tuple(i for i in range(layers) if i >= first_sparse and i % every == 0)


def _mla(family: Family, raw: dict[str, Any], source: str, need, yarn: YarnScaling | None) -> MLAConfig:
    _refuse_unless(raw, source, "attention_bias", (False,), False)
    nope, rope = need("qk_nope_head_dim"), need("qk_rope_head_dim")
    scale = (nope + rope) ** -0.5
    if yarn is not None and yarn.mscale_all_dim:
        # DeepSeek's YaRN also sharpens the softmax by mscale(factor, mscale_all_dim) squared
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return MLAConfig(
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=need("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=need("v_head_dim"),
        softmax_scale=scale,
        rope_interleave=bool(raw.get("rope_interleave", True)),
        # openPangu's latent norms take the model's eps (vLLM's openpangu.py)
        latent_norm_eps=float(raw.get("rms_norm_eps", 1e-6)) if family == "pangu_ultra_moe" else 1e-6,
    )
