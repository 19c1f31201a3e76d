"""openPangu-Embedded (`PanguEmbeddedForCausalLM`, the release's dense "Pangu 7B") against a reference.

No released `transformers` has the family. Its released modeling code is Llama with biases on
q, k, v and o, switched by the config key `bias`; `transformers`' Llama with `attention_bias`
is exactly that, so it is the reference, loaded with our generated checkpoint's tensors.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import expertmesh.model.loader as loader
from expertmesh import LLM, SamplingParams
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.config import ModelConfig
from expertmesh.model.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def embedded(tiny_checkpoint):
    return tiny_checkpoint("pangu_embedded")


def reference(path):
    c = json.loads((path / "config.json").read_text())
    config = transformers.LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"],
        attention_bias=c["bias"],
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    tensors = {
        k: v for k, v in load_file(path / "model.safetensors").items() if "rotary_emb.inv_freq" not in k
    }
    model.load_state_dict(tensors, strict=True)  # every released tensor but the stale buffer, nothing missing
    return model


def test_the_config_switches_biases_on_q_k_v_and_o_with_bias(embedded):
    cfg = ModelConfig.from_file(embedded / "config.json")
    assert (cfg.family, cfg.qkv_bias, cfg.o_bias, cfg.moe) == ("pangu_embedded", True, True, None)
    raw = json.loads((embedded / "config.json").read_text())
    assert not ModelConfig.from_hf(raw | {"bias": False}).o_bias


def test_logits_match_llama_with_attention_biases(embedded):
    ref, ours = reference(embedded), load_model(embedded, "float32")
    gen = torch.Generator().manual_seed(0)
    for n in (1, 9, 40):
        tokens = torch.randint(3, 2048, (n,), generator=gen)
        with torch.no_grad():
            want = ref(tokens[None]).logits[0]
            got = ours.logits(ours(tokens, ForwardBatch(torch.arange(n), prefills=[PrefillSpan(0, n)])))
        assert (got - want).abs().max().item() < 1e-4
    # the o biases matter at this scale: without them the logits move far beyond the tolerance
    for layer in ours.layers:
        layer.self_attn.o_proj.bias.zero_()
    with torch.no_grad():
        got = ours.logits(ours(tokens, ForwardBatch(torch.arange(n), prefills=[PrefillSpan(0, n)])))
    assert (got - want).abs().max().item() > 1e-2


def test_the_stale_rotary_buffer_is_never_read_and_every_other_tensor_is(embedded, monkeypatch):
    stores = []

    class Recording(loader.TensorStore):
        def __init__(self, directory):
            super().__init__(directory)
            stores.append(self)

    monkeypatch.setattr(loader, "TensorStore", Recording)
    load_model(embedded, "float32")
    (store,) = stores
    stale = {
        k for k in load_file(embedded / "model.safetensors") if k.endswith("self_attn.rotary_emb.inv_freq")
    }
    assert len(stale) == json.loads((embedded / "config.json").read_text())["num_hidden_layers"]
    assert set(store.keys_read) == set(load_file(embedded / "model.safetensors")) - stale


def test_the_engine_serves_it(embedded):
    llm = LLM(embedded, show_progress=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    (out,) = llm.generate(["def f(x):"], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8
