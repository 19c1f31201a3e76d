"""The generated checkpoints have the real families' layout, are deterministic, and load in transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertmesh.model.checkpoint_maker import (
    ARCHITECTURES,
    SIZES,
    checkpoint_config,
    make_checkpoint,
    tensor_specs,
)
from expertmesh.model.tokenizer_training import SPECIAL_TOKENS

# Families transformers implements; Pangu Pro MoE it does not.
HF_ARCHS = ("llama", "qwen2_moe", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny float32 checkpoint per architecture, made once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_checkpoint(arch, "tiny", root / arch, progress=False) for arch in ARCHITECTURES}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("model*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in tensors, f"{name} stored twice"
                tensors[name] = f.get_tensor(name)
    return tensors


def expected_layer(arch: str, c: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of one layer, written out by hand from each family's published layout."""
    H, D = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    t = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H),
        "self_attn.k_proj.weight": (kv, H),
        "self_attn.v_proj.weight": (kv, H),
        "self_attn.o_proj.weight": (H, q),
    }

    def ffn(prefix, gate, up, down, inner):
        t[f"{prefix}.{gate}.weight"] = (inner, H)
        t[f"{prefix}.{up}.weight"] = (inner, H)
        t[f"{prefix}.{down}.weight"] = (H, inner)

    if arch in ("llama", "pangu_embedded"):
        ffn("mlp", "gate_proj", "up_proj", "down_proj", c["intermediate_size"])
    elif arch == "mixtral":
        t["block_sparse_moe.gate.weight"] = (c["num_local_experts"], H)
        for e in range(c["num_local_experts"]):
            ffn(f"block_sparse_moe.experts.{e}", "w1", "w3", "w2", c["intermediate_size"])
    else:
        E = c["num_experts"]
        t["mlp.gate.weight"] = (E, H)
        for e in range(E):
            ffn(f"mlp.experts.{e}", "gate_proj", "up_proj", "down_proj", c["moe_intermediate_size"])
    if arch in ("qwen2_moe", "pangu_pro_moe"):
        for proj, out in (("q", q), ("k", kv), ("v", kv)):
            t[f"self_attn.{proj}_proj.bias"] = (out,)
        ffn("mlp.shared_expert", "gate_proj", "up_proj", "down_proj", c["shared_expert_intermediate_size"])
    if arch == "pangu_embedded":  # openPangu-Embedded: biases on q, k, v and o; a stale RoPE buffer
        for proj, out in (("q", q), ("k", kv), ("v", kv), ("o", H)):
            t[f"self_attn.{proj}_proj.bias"] = (out,)
        t["self_attn.rotary_emb.inv_freq"] = (D // 2,)
    if arch == "qwen2_moe":
        t["mlp.shared_expert_gate.weight"] = (1, H)
    if arch == "qwen3_moe":
        t["self_attn.q_norm.weight"] = (D,)
        t["self_attn.k_norm.weight"] = (D,)
    if arch == "pangu_pro_moe":
        t["self_attn.o_proj.bias"] = (H,)
        t["mlp.router_scale"] = (1, c["num_experts"])
    return t


# The DeepSeek-V3 architecture's layouts are checked by transformers' own model reading them
# (tests/unit/test_deepseek_v3.py, test_pangu_ultra_moe.py)
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ("deepseek_v3", "pangu_ultra_moe")])
def test_every_tensor_has_the_family_name_and_shape(tiny, arch):
    config = json.loads((tiny[arch] / "config.json").read_text())
    V, H = config["vocab_size"], config["hidden_size"]
    expected = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for layer in range(config["num_hidden_layers"]):
        for name, shape in expected_layer(arch, config).items():
            expected[f"model.layers.{layer}.{name}"] = shape

    tensors = read_tensors(tiny[arch])
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # The pure layout function describes exactly what was written.
    assert {s.name: s.shape for s in tensor_specs(config)} == expected
    assert len(list(tensor_specs(config))) == len(expected)


def test_configs_carry_the_family_keys():
    pangu = checkpoint_config("pangu_pro_moe", "small")
    assert pangu["architectures"] == ["PanguProMoEForCausalLM"]
    assert pangu["model_type"] == "PanguProMoE"
    assert (pangu["num_experts"], pangu["num_experts_per_tok"]) == (32, 8)  # 8 groups of 4
    assert checkpoint_config("pangu_pro_moe", "tiny")["num_experts_per_tok"] == 4
    assert checkpoint_config("mixtral", "tiny")["intermediate_size"] == 64
    assert checkpoint_config("qwen3_moe", "tiny")["norm_topk_prob"] is True
    assert checkpoint_config("qwen2_moe", "tiny")["norm_topk_prob"] is False
    assert checkpoint_config("llama", "small")["rope_theta"] == 5e5
    embedded = checkpoint_config("pangu_embedded", "small")
    assert (embedded["architectures"], embedded["model_type"]) == (
        ["PanguEmbeddedForCausalLM"],
        "PanguEmbedded",
    )
    assert (embedded["bias"], embedded["rope_theta"], "attention_bias" in embedded) == (True, 1.6e7, False)
    deepseek = checkpoint_config("deepseek_v3", "small")  # DeepSeek-V3's own rope_theta and YaRN key
    assert (deepseek["rope_theta"], deepseek["rope_scaling"]["type"]) == (10000.0, "yarn")
    assert (deepseek["n_routed_experts"], deepseek["n_group"], deepseek["topk_group"]) == (32, 8, 4)
    for arch in ARCHITECTURES:
        for size in SIZES:
            config = checkpoint_config(arch, size)
            assert config["tie_word_embeddings"] is False
            assert config["rms_norm_eps"] == (1e-5 if arch.startswith("pangu_") else 1e-6)
            assert config["torch_dtype"] == "float32"
            assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
            if arch.startswith("pangu_"):  # the Pangu releases' theta
                assert config["rope_theta"] == 1.6e7
            elif arch not in ("llama", "deepseek_v3"):
                assert config["rope_theta"] == 1e6
            if arch == "pangu_pro_moe":
                assert config["num_experts"] % config["num_experts_per_tok"] == 0


def test_norms_are_not_identity_and_router_scale_is_in_range(tiny):
    tensors = read_tensors(tiny["pangu_pro_moe"])
    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))
    assert (norm - 1).abs().max() < 0.2
    scale = tensors["model.layers.1.mlp.router_scale"]
    assert scale.min() >= 0.5 and scale.max() <= 1.5
    assert tensors["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)


def test_pangu_embedded_ships_a_sentencepiece_tokenizer_as_the_release_does(tiny):
    out = tiny["pangu_embedded"]
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["legacy"], config["eos_token"]) == (True, True, "[unused10]")
    assert config["added_tokens_decoder"]["13"]["content"] == "[unused10]"
    model = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (model["bos_token_id"], model["eos_token_id"], generation["eos_token_id"]) == (1, 13, 13)


def test_sentencepiece_training_is_deterministic_across_processes(tiny):
    code = (
        "import sys; from expertmesh.model.tokenizer_training import train_sentencepiece; "
        "sys.stdout.buffer.write(train_sentencepiece(2048))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert fresh == (tiny["pangu_embedded"] / "tokenizer.model").read_bytes()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny):
    again = make_checkpoint("qwen2_moe", "tiny", tmp_path / "again", seed=0, progress=False)
    other = make_checkpoint("qwen2_moe", "tiny", tmp_path / "other", seed=1, progress=False)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny["qwen2_moe"] / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_tokenizer_training_is_deterministic_across_processes(tiny):
    # Rust hash maps are seeded per process, so compare against a fresh interpreter.
    code = (
        "import sys; from expertmesh.model.tokenizer_training import train_tokenizer; "
        "sys.stdout.write(train_tokenizer(2048).to_str())"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    from tokenizers import Tokenizer

    assert fresh == Tokenizer.from_file(str(tiny["llama"] / "tokenizer.json")).to_str()


def test_sharded_index_covers_every_tensor_once(tmp_path, tiny):
    out = make_checkpoint("mixtral", "tiny", tmp_path / "sharded", max_shard_size=200_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert not (out / "model.safetensors").exists()
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)

    tensors = read_tensors(out)  # asserts no tensor is stored twice
    assert set(index["weight_map"]) == set(tensors)
    for name, filename in index["weight_map"].items():
        with safe_open(out / filename, framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Sharding changes the files, not the values.
    whole = read_tensors(tiny["mixtral"])
    assert all(torch.equal(tensors[name], whole[name]) for name in whole)


def test_rewriting_unsharded_removes_old_shards(tmp_path):
    out = tmp_path / "ckpt"
    make_checkpoint("llama", "tiny", out, max_shard_size=100_000, progress=False)
    make_checkpoint("llama", "tiny", out, progress=False)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_bfloat16_is_written_as_bf16(tmp_path, tiny):
    out = make_checkpoint("qwen3_moe", "tiny", tmp_path / "bf16", dtype="bfloat16", progress=False)
    header_size = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((out / "model.safetensors").read_bytes()[8 : 8 + header_size])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16, fp32 = read_tensors(out), read_tensors(tiny["qwen3_moe"])
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in fp32)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_transformers_loads_with_no_missing_or_unexpected_keys(tiny, arch):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tiny[arch], output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert type(model).__name__ == checkpoint_config(arch, "tiny")["architectures"][0]
    ours = read_tensors(tiny[arch])
    assert torch.equal(model.model.embed_tokens.weight, ours["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, ours["lm_head.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 2048) and torch.isfinite(logits).all()


def test_auto_tokenizer_loads_and_applies_chatml(tiny):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny["qwen2_moe"])
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert len(tok) <= checkpoint_config("qwen2_moe", "tiny")["vocab_size"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2
    assert tok.decode(ids) == text
    generation = json.loads((tiny["qwen2_moe"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"arch": "gpt2"}, "arch"),
        ({"size": "huge"}, "size"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_unknown_values_name_the_argument(tmp_path, kwargs, argument):
    args = {"arch": "llama", "size": "tiny", "dtype": "float32"} | kwargs
    with pytest.raises(ValueError, match=rf"unknown {argument} .*expected one of"):
        make_checkpoint(args["arch"], args["size"], tmp_path / "x", dtype=args["dtype"], progress=False)
    assert not (tmp_path / "x").exists()
