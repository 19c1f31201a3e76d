"""openPangu-Ultra-MoE (`PanguUltraMoEForCausalLM`) against a reference written here from its public
definition, mainline vLLM's `openpangu.py`: DeepSeek-V3's MLA attention and sigmoid routing
(transformers' own DeepSeek-V3 modules), with the latent norms on the model's eps, one routing
group, and sandwich norms composed as openpangu.py's decoder layer does:

    x = x + post_attention_layernorm(attn(input_layernorm(x)))
    x = x + post_mlp_layernorm(mlp(pre_mlp_layernorm(x)))
"""

import json
import shutil
import types

import pytest
import torch
import transformers
from safetensors import safe_open

from expertmesh import LLM, SamplingParams
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.checkpoint_maker import make_checkpoint
from expertmesh.model.config import ModelConfig
from expertmesh.model.loader import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("pangu_ultra_moe", "tiny", tmp_path_factory.mktemp("ultra"), progress=False)


def sandwich_forward(layer, pre_mlp, post_mlp):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):  # fmt: skip
        attended, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        return hidden_states + post_mlp(self.mlp(pre_mlp(hidden_states)))

    return types.MethodType(forward, layer)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    raw = json.loads((checkpoint / "config.json").read_text())
    as_deepseek = tmp_path_factory.mktemp("ultra-as-deepseek")
    shutil.copy(checkpoint / "model.safetensors", as_deepseek / "model.safetensors")
    config = raw | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "n_group": 1,
        "topk_group": 1,
        "rope_interleave": True,  # vLLM: is_neox_style=False
    }
    (as_deepseek / "config.json").write_text(json.dumps(config))
    model = transformers.AutoModelForCausalLM.from_pretrained(as_deepseek, dtype=torch.float32).eval()
    eps = raw["rms_norm_eps"]
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        for i, layer in enumerate(model.model.layers):
            norms = []
            for name in ("pre_mlp_layernorm", "post_mlp_layernorm"):
                norm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(
                    raw["hidden_size"], eps
                )
                norm.weight.data.copy_(f.get_tensor(f"model.layers.{i}.{name}.weight"))
                norms.append(norm)
            layer.forward = sandwich_forward(layer, *norms)
            layer.self_attn.q_a_layernorm.variance_epsilon = eps  # openpangu.py: the model's eps
            layer.self_attn.kv_a_layernorm.variance_epsilon = eps
    return model


def test_the_config_reads_as_deepseek_v3_with_sandwich_norms_and_one_group(checkpoint):
    cfg = ModelConfig.from_file(checkpoint / "config.json")
    assert cfg.family == "pangu_ultra_moe" and cfg.sandwich_norm and cfg.mla is not None
    assert cfg.moe.routing == "noaux_tc" and (cfg.moe.num_groups, cfg.moe.topk_group) == (1, 1)
    assert cfg.moe.expert_bias and cfg.mla.latent_norm_eps == 1e-5 and cfg.rope_scaling is None
    # a SentencePiece tokenizer only, as the Pangu releases ship
    assert (checkpoint / "tokenizer.model").is_file() and not (checkpoint / "tokenizer.json").exists()


def test_prefill_logits_match_the_reference(checkpoint, reference):
    ours = load_model(checkpoint, "float32")
    tokens = torch.randint(0, 2048, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(tokens[None]).logits[0]
    got = ours.logits(ours(tokens, ForwardBatch(torch.arange(40), prefills=[PrefillSpan(0, 40)])))
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-4 * scale + 1e-6


def test_batched_greedy_generation_equals_the_reference(checkpoint, reference):
    llm = LLM(
        checkpoint,
        "float32",
        skip_tokenizer_init=True,
        show_progress=False,
        max_num_batched_tokens=32,
        max_num_seqs=8,
    )
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (5, 17, 48, 9)]
    ours = llm.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False
    )
    for tokens, out in zip(prompts, ours, strict=True):
        ids = torch.tensor([tokens])
        want = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(tokens) :].tolist()
        assert out.outputs[0].token_ids == want


def test_a_checkpoint_without_the_routing_bias_chooses_on_the_scores(checkpoint, tmp_path):
    """`router_enable_expert_bias: false`: no bias is read, and none is added (not memory left uninitialised)."""
    for item in checkpoint.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "config.json").unlink()
    raw = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"router_enable_expert_bias": False}))
    model = load_model(tmp_path, "float32")
    assert all(torch.equal(b.e_score_correction_bias, torch.zeros(16)) for b in model.moe_blocks)


def test_it_serves_text_through_its_sentencepiece_tokenizer(checkpoint):
    llm = LLM(checkpoint, show_progress=False)
    (out,) = llm.generate(
        ["用户：你好"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert len(out.outputs[0].token_ids) == 6
    assert out.prompt_token_ids[0] == 1  # BOS added, as the release's tokenizer_config asks
