"""Pangu Pro MoE in its released layout against a plain-torch forward written here from the released
definition (Huawei's pangu_moe.py for vllm-ascend, and arXiv 2505.21411), reading the tensors
straight from the safetensors file:

- attention: GQA with biases on q, k, v and o; rotate-half RoPE at rope_theta;
- MoGE: softmax over all experts, the best expert in each of num_experts_per_tok equal groups,
  its probability times router_scale, no renormalisation; plus the shared expert, ungated;
- RMSNorm before attention and before the MLP, and at the end; an untied LM head.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from expertmesh import LLM, SamplingParams
from expertmesh.model.config import ModelConfig


@pytest.fixture(scope="module")
def pangu(tiny_checkpoint):
    return tiny_checkpoint("pangu_pro_moe")


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swiglu(x, w, prefix):
    gate, up = x @ w[f"{prefix}.gate_proj.weight"].T, x @ w[f"{prefix}.up_proj.weight"].T
    return (F.silu(gate) * up) @ w[f"{prefix}.down_proj.weight"].T


def reference_logits(path, tokens: list[int]) -> torch.Tensor:
    """[T, vocab] logits of the whole sequence, no cache."""
    raw = json.loads((path / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    eps, heads, kv_heads = raw["rms_norm_eps"], raw["num_attention_heads"], raw["num_key_value_heads"]
    head_dim, experts, groups = raw["head_dim"], raw["num_experts"], raw["num_experts_per_tok"]
    n = len(tokens)
    inv_freq = 1.0 / raw["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(n).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # [heads, T, d]
        half = head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)

        def proj(name, t, p=p):
            return t @ w[f"{p}.self_attn.{name}_proj.weight"].T + w[f"{p}.self_attn.{name}_proj.bias"]

        q = rope(proj("q", h).view(n, heads, head_dim).transpose(0, 1))
        k = rope(proj("k", h).view(n, kv_heads, head_dim).transpose(0, 1)).repeat_interleave(
            heads // kv_heads, 0
        )
        v = proj("v", h).view(n, kv_heads, head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        scores = (q @ k.transpose(1, 2)) / head_dim**0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * head_dim)
        x = x + proj("o", attended)

        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        probs = (h @ w[f"{p}.mlp.gate.weight"].T).softmax(-1)
        scale = w[f"{p}.mlp.router_scale"].reshape(-1)
        out = swiglu(h, w, f"{p}.mlp.shared_expert")
        per_group = experts // groups
        for t in range(n):
            for g in range(groups):
                e = g * per_group + int(probs[t, g * per_group : (g + 1) * per_group].argmax())
                out[t] += probs[t, e] * scale[e] * swiglu(h[t], w, f"{p}.mlp.experts.{e}")
        x = x + out
    return rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def test_the_released_config_has_no_intermediate_size_and_the_pangu_facts(pangu):
    raw = json.loads((pangu / "config.json").read_text())
    assert "intermediate_size" not in raw
    assert (raw["architectures"], raw["model_type"]) == (["PanguProMoEForCausalLM"], "PanguProMoE")
    assert (raw["rope_theta"], raw["rms_norm_eps"]) == (1.6e7, 1e-5)
    cfg = ModelConfig.from_hf(raw)
    assert cfg.moe.routing == "moge" and cfg.qkv_bias and cfg.o_bias and cfg.moe.router_scale


def test_logits_match_the_plain_torch_reference(pangu):
    from expertmesh.model.attention import ForwardBatch, PrefillSpan
    from expertmesh.model.loader import load_model

    ours = load_model(pangu, "float32")
    tokens = torch.randint(0, 2048, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference_logits(pangu, tokens)
    got = ours.logits(
        ours(torch.tensor(tokens), ForwardBatch(torch.arange(24), prefills=[PrefillSpan(0, 24)]))
    )
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-6


def test_greedy_output_equals_the_plain_torch_reference(pangu):
    llm = LLM(pangu, "float32", skip_tokenizer_init=True, show_progress=False, max_num_seqs=8)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (3, 11)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    for tokens, out in zip(prompts, outs, strict=True):
        sequence = list(tokens)
        for _ in range(6):
            sequence.append(int(reference_logits(pangu, sequence)[-1].argmax()))
        assert out.outputs[0].token_ids == sequence[len(tokens) :]
