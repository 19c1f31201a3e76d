"""DeepSeek-V3 as released: the config it ships, what the MLA cache stores, the layout make-checkpoint
writes (read by transformers itself), and the config features we refuse rather than run wrongly.
Logits and generation parity on transformers-written checkpoints: test_parity_transformers.py."""

import json
import logging
import math

import pytest
import torch
import transformers
from safetensors import safe_open

from expertmesh import LLM, SamplingParams
from expertmesh.engine.kv_cache import KVCache, bytes_per_token
from expertmesh.errors import CheckpointError
from expertmesh.kernels import native_kernels
from expertmesh.kernels.guard import CHOICES, NATIVE, TORCH
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.checkpoint_maker import checkpoint_config, make_checkpoint
from expertmesh.model.config import ModelConfig
from expertmesh.model.experts import ExpertPartition
from expertmesh.model.loader import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("deepseek_v3", "tiny", tmp_path_factory.mktemp("deepseek_v3"), progress=False)


def test_the_released_config_keys_become_mla_noaux_tc_and_yarn():
    raw = checkpoint_config("deepseek_v3", "tiny")
    cfg = ModelConfig.from_hf(raw)
    assert cfg.family == "deepseek_v3" and "head_dim" not in raw
    assert cfg.moe.routing == "noaux_tc" and cfg.moe.num_routing_groups == raw["n_group"] == 4
    assert (cfg.moe.topk_group, cfg.moe.routed_scaling_factor) == (2, 2.5)
    assert cfg.moe.shared_expert_intermediate_size == raw["moe_intermediate_size"]  # one shared expert
    assert cfg.moe_layers == (1,)  # first_k_dense_replace=1
    assert cfg.num_mtp_layers == 1
    assert (
        cfg.head_dim == 32 and cfg.rotary_dim == 16
    )  # a query head is nope + rope; RoPE turns the rope part
    # the softmax scale is sharpened by YaRN's mscale(factor, mscale_all_dim) squared
    mscale = 0.1 * math.log(4.0) + 1.0
    assert cfg.mla.softmax_scale == pytest.approx(32**-0.5 * mscale**2)


@pytest.mark.parametrize(
    ("key", "value"),
    [("topk_method", "group_limited_greedy"), ("scoring_func", "softmax"), ("attention_bias", True)],
)
def test_a_feature_we_do_not_implement_fails_at_load_naming_key_and_value(key, value):
    raw = checkpoint_config("deepseek_v3", "tiny") | {key: value}
    with pytest.raises(CheckpointError, match=f"{key}={value!r} is not supported"):
        ModelConfig.from_hf(raw)


def test_bad_group_settings_name_the_keys():
    raw = checkpoint_config("deepseek_v3", "tiny")
    with pytest.raises(CheckpointError, match="n_group"):
        ModelConfig.from_hf(raw | {"n_group": 3})
    with pytest.raises(CheckpointError, match="topk_group"):
        ModelConfig.from_hf(raw | {"topk_group": 5})


def test_the_cache_stores_the_latent_and_rope_key_only(checkpoint):
    cfg = ModelConfig.from_file(checkpoint / "config.json")
    for dtype in (torch.float32, torch.bfloat16):
        # MLA: (kv_lora_rank + qk_rope_head_dim) values a token and layer, not 2 x heads x head_dim
        want = cfg.num_layers * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * dtype.itemsize
        assert bytes_per_token(cfg, dtype) == want
        cache = KVCache(cfg, num_blocks=4, block_size=16, dtype=dtype)
        stored = sum(layer.latent.nbytes for layer in cache.layers)
        assert stored == want * 4 * 16
        assert cache.describe()["bytes_per_token"] == want
    llm = LLM(checkpoint, "float32", show_progress=False)
    assert llm.engine.cache.describe()["layout"] == "MLA latent 32 + rope key 16"


def test_the_generated_layout_is_what_transformers_reads(checkpoint):
    """make-checkpoint's names and shapes against transformers' own DeepSeek-V3, which also
    reads the released rope_scaling key; the MTP layer it does not know is the only leftover."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ours = load_model(checkpoint, "float32")
    tokens = torch.randint(0, 2048, (70,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(tokens[None]).logits[0]
    got = ours.logits(ours(tokens, ForwardBatch(torch.arange(70), prefills=[PrefillSpan(0, 70)])))
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-6


def test_the_mtp_layer_is_stored_after_the_last_layer_as_released(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    hidden, vocab, mtp = raw["hidden_size"], raw["vocab_size"], f"model.layers.{raw['num_hidden_layers']}"
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if k.startswith(f"{mtp}.")]  # noqa: SIM118 (safe_open is not a dict)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert shapes[f"{mtp}.eh_proj.weight"] == (hidden, 2 * hidden)
    assert shapes[f"{mtp}.shared_head.head.weight"] == (vocab, hidden)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        assert shapes[f"{mtp}.{norm}.weight"] == (hidden,)
    # and a whole decoder layer: MLA attention and a sparse MLP
    assert (
        f"{mtp}.self_attn.kv_b_proj.weight" in shapes and f"{mtp}.mlp.gate.e_score_correction_bias" in shapes
    )


def test_mtp_layers_are_accepted_and_logged_not_read(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="expertmesh.model.loader"):
        load_model(checkpoint, "float32")
    assert "1 multi-token-prediction layer(s) (model.layers.2.*)" in caplog.text
    index = json.loads((checkpoint / "config.json").read_text())
    assert index["num_nextn_predict_layers"] == 1


def test_bf16_keeps_the_correction_bias_in_fp32_and_serves(checkpoint):
    llm = LLM(checkpoint, "bfloat16", show_progress=False)
    block = llm.engine.model.moe_blocks[0]
    assert block.e_score_correction_bias.dtype == torch.float32
    assert block.gate.weight.dtype == torch.bfloat16
    out = llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_the_guard_times_mla_decode_and_both_paths_give_the_same_tokens(checkpoint):
    """The load-time guard measures MLA's decode attention as its `attention` op (the native
    kernel reading the latent cache in place against two torch matmuls), and greedy decoding
    is the same on either path."""
    if native_kernels() is None:
        pytest.skip("the native kernels did not build here")
    llm = LLM(checkpoint, "float32", show_progress=False)
    assert any(line.startswith("attention decode") for line in llm.engine.kernel_report)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = ["def main():", "the quick brown fox jumps over", "1, 2, 3,"]
    outputs = {}
    for path in (NATIVE, TORCH):
        with CHOICES.forced("attention", path):
            outputs[path] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs[NATIVE] == outputs[TORCH]


def test_its_routing_groups_carry_unequal_loads_which_the_pool_metrics_show(checkpoint):
    """Unlike MoGE (every token one row in every group: 1.00), noaux_tc sends each token to only
    topk_group of the n_group pools, so the per-pool loads the engine exports differ."""
    from expertmesh.serve.metrics import group_loads, imbalance

    llm = LLM(checkpoint, "float32", show_progress=False)
    llm.generate(["def main():"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    block = llm.engine.model.moe_blocks[0]
    moe = block.moe
    loads = group_loads(block.last_expert_counts, ExpertPartition(moe.num_experts, moe.num_routing_groups))
    assert sum(loads) == len(llm.engine.tokenize("def main():")[1]) * moe.num_experts_per_tok
    assert imbalance(loads) > 1.0
