"""YaRN RoPE against `transformers`' own implementation, and a YaRN model's logits against transformers'."""

import pytest
import torch

from expertmesh.errors import CheckpointError
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.config import ModelConfig
from expertmesh.model.loader import load_model
from expertmesh.model.rope import YarnScaling, inverse_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


@pytest.mark.parametrize(
    "head_dim,theta,params",
    [
        (128, 1e6, {"factor": 4.0, "original_max_position_embeddings": 32768}),  # Qwen's long context
        (
            64,
            1e4,
            {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
        ),
        (
            64,
            1e4,
            {
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "mscale": 1.0,
                "mscale_all_dim": 0.707,
            },
        ),
        (
            16,
            500.0,
            {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "truncate": False},
        ),
        (32, 1e4, {"factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.3}),
    ],
)
def test_yarn_frequencies_and_attention_factor_match_transformers(head_dim, theta, params):
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=params["original_max_position_embeddings"] * 4,
        rope_parameters={"rope_type": "yarn", "rope_theta": theta, **params},
    )
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    got_freq, got_factor = inverse_frequencies(head_dim, theta, YarnScaling(**params))
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)


def test_default_rope_is_unscaled():
    freq, factor = inverse_frequencies(8, 10000.0)
    assert factor == 1.0
    torch.testing.assert_close(freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))


def test_config_reads_yarn_from_either_key_and_refuses_other_scalings():
    base = dict(
        architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=256,
    )  # fmt: skip
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert ModelConfig.from_hf(base | {"rope_scaling": yarn}).rope_scaling.factor == 4.0
    v5 = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 2.0, "original_max_position_embeddings": 128}
    cfg = ModelConfig.from_hf(base | {"rope_parameters": v5})
    assert (cfg.rope_theta, cfg.rope_scaling.factor) == (5e5, 2.0)
    # DeepSeek-V3 style: no factor key, the ratio of the context lengths
    deepseek = {"type": "yarn", "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert ModelConfig.from_hf(base | {"rope_scaling": deepseek}).rope_scaling.factor == 4.0
    assert ModelConfig.from_hf(base).rope_scaling is None
    with pytest.raises(CheckpointError, match="rope_scaling has rope type 'linear', which is not supported"):
        ModelConfig.from_hf(base | {"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_a_yarn_model_matches_transformers_beyond_its_original_context(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 16},
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, "float32")
    assert ours.config.rope_scaling is not None
    tokens = torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(tokens[None]).logits[0]
        got = ours.logits(ours(tokens, ForwardBatch(torch.arange(90), prefills=[PrefillSpan(0, 90)])))
    assert (got - want).abs().max().item() < 1e-4
    # YaRN matters at these positions: default RoPE is far off
    plain = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**config.to_dict(), "rope_parameters": None})
    )
    plain.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert (plain.eval()(tokens[None]).logits[0] - want).abs().max().item() > 1e-2
