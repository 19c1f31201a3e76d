"""Where each family keeps each tensor in an HF checkpoint, and the shape it must have."""

from __future__ import annotations

from expertmesh.model.config import ModelConfig

Shape = tuple[int, ...]


def _layer(i: int) -> str:
    return f"model.layers.{i}"


def moe_prefix(cfg: ModelConfig, layer: int) -> str:
    return f"{_layer(layer)}.{'block_sparse_moe' if cfg.family == 'mixtral' else 'mlp'}"


def expert_tensors(cfg: ModelConfig, layer: int, expert: int) -> dict[str, tuple[str, Shape]]:
    """{'gate'|'up'|'down': (key, shape)} of one routed expert."""
    hidden, inter = cfg.hidden_size, cfg.moe.moe_intermediate_size
    base = f"{moe_prefix(cfg, layer)}.experts.{expert}"
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return {
        "gate": (f"{base}.{names[0]}.weight", (inter, hidden)),
        "up": (f"{base}.{names[1]}.weight", (inter, hidden)),
        "down": (f"{base}.{names[2]}.weight", (hidden, inter)),
    }


def mlp_tensors(prefix: str, hidden: int, inter: int) -> dict[str, tuple[str, Shape]]:
    return {
        "gate": (f"{prefix}.gate_proj.weight", (inter, hidden)),
        "up": (f"{prefix}.up_proj.weight", (inter, hidden)),
        "down": (f"{prefix}.down_proj.weight", (hidden, inter)),
    }


def shared_expert_prefix(cfg: ModelConfig, layer: int) -> str:
    """DeepSeek fuses its `n_shared_experts` under a plural name."""
    plural = cfg.mla is not None  # the DeepSeek-V3 architecture
    return f"{moe_prefix(cfg, layer)}.{'shared_experts' if plural else 'shared_expert'}"


def mla_tensors(cfg: ModelConfig, layer: int) -> dict[str, tuple[str, Shape]]:
    """Multi-head latent attention: the low-rank query (or one q_proj), the joint latent-and-rope-key
    projection, its norm, the latent's up-projection to per-head K (no rope) and V, and o_proj."""
    mla, hidden, heads = cfg.mla, cfg.hidden_size, cfg.num_heads
    base = f"{_layer(layer)}.self_attn"
    names: dict[str, tuple[str, Shape]] = {
        "kv_a": (f"{base}.kv_a_proj_with_mqa.weight", (mla.cache_width, hidden)),
        "kv_a_norm": (f"{base}.kv_a_layernorm.weight", (mla.kv_lora_rank,)),
        "kv_b": (
            f"{base}.kv_b_proj.weight",
            (heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
        ),
        "o": (f"{base}.o_proj.weight", (hidden, heads * mla.v_head_dim)),
    }
    if mla.q_lora_rank is None:
        return names | {"q": (f"{base}.q_proj.weight", (heads * mla.qk_head_dim, hidden))}
    return names | {
        "q_a": (f"{base}.q_a_proj.weight", (mla.q_lora_rank, hidden)),
        "q_a_norm": (f"{base}.q_a_layernorm.weight", (mla.q_lora_rank,)),
        "q_b": (f"{base}.q_b_proj.weight", (heads * mla.qk_head_dim, mla.q_lora_rank)),
    }


def attention_tensors(cfg: ModelConfig, layer: int) -> dict[str, tuple[str, Shape]]:
    hidden, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    base = f"{_layer(layer)}.self_attn"
    names: dict[str, tuple[str, Shape]] = {
        "q": (f"{base}.q_proj.weight", (q, hidden)),
        "k": (f"{base}.k_proj.weight", (kv, hidden)),
        "v": (f"{base}.v_proj.weight", (kv, hidden)),
        "o": (f"{base}.o_proj.weight", (hidden, q)),
    }
    if cfg.qkv_bias:
        names |= {
            "q_bias": (f"{base}.q_proj.bias", (q,)),
            "k_bias": (f"{base}.k_proj.bias", (kv,)),
            "v_bias": (f"{base}.v_proj.bias", (kv,)),
        }
    if cfg.o_bias:
        names["o_bias"] = (f"{base}.o_proj.bias", (hidden,))
    if cfg.qk_norm:
        names |= {
            "q_norm": (f"{base}.q_norm.weight", (cfg.head_dim,)),
            "k_norm": (f"{base}.k_norm.weight", (cfg.head_dim,)),
        }
    return names
