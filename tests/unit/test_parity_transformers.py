"""Our model against `transformers` on checkpoints that `transformers` itself wrote."""

import json

import pytest
import safetensors.torch
import torch
import transformers

from expertmesh import LLM, SamplingParams
from expertmesh.engine.kv_cache import KVCache
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.scheduler import StepPlan
from expertmesh.engine.sequence import Sequence
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.loader import load_model

DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}
COMMON = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
FAMILIES = {
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        )
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        )
    ),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=128)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, intermediate_size=128)),
    # MLA with a low-rank query, noaux_tc routing over 4 groups keeping 2, a dense first layer,
    # two shared experts, and YaRN: the longest prompts and their outputs pass the original context
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **(COMMON | {"num_hidden_layers": 3, "num_key_value_heads": 4}),
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            max_position_embeddings=256,
            rope_parameters=DEEPSEEK_YARN,
        )
    ),
    # DeepSeek-V2-Lite's shape of MLA: one q_proj, no low-rank query
    "deepseek_v3_q_proj": lambda: transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **(COMMON | {"num_key_value_heads": 4}),
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=32,
        )
    ),
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    with torch.no_grad():  # HF's init is tiny; spread the weights so the logits say something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero would leave the choosing-only bias untested
                buffer.copy_(torch.randn_like(buffer) * 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    if isinstance(model, transformers.DeepseekV3ForCausalLM):
        add_mtp_layer(path, model.config)
    return model, path


def add_mtp_layer(path, config):
    """A multi-token-prediction layer stored after the last layer, as DeepSeek's releases have it
    (transformers neither writes nor reads it)."""
    mtp, hidden = f"model.layers.{config.num_hidden_layers}", config.hidden_size
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    extra = {
        f"{mtp}.enorm.weight": torch.ones(hidden),
        f"{mtp}.hnorm.weight": torch.ones(hidden),
        f"{mtp}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
        f"{mtp}.shared_head.norm.weight": torch.ones(hidden),
        f"{mtp}.shared_head.head.weight": torch.randn(config.vocab_size, hidden),
    }
    safetensors.torch.save_file(tensors | extra, path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | {"num_nextn_predict_layers": 1}))


def prompts(n_tokens_list, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in n_tokens_list]


def test_logits_without_cache(hf_checkpoint):
    reference, path = hf_checkpoint
    ours = load_model(path, "float32")
    for tokens in prompts([1, 7, 33, 64]):
        with torch.no_grad():
            want = reference(torch.tensor([tokens])).logits[0]
        n = len(tokens)
        got = ours.logits(
            ours(torch.tensor(tokens), ForwardBatch(torch.arange(n), prefills=[PrefillSpan(0, n)]))
        )
        assert (got - want).abs().max().item() < TOLERANCE


def test_logits_with_paged_cache_chunked_prefill_then_decode(hf_checkpoint):
    reference, path = hf_checkpoint
    ours = load_model(path, "float32")
    (tokens,) = prompts([40], seed=1)
    with torch.no_grad():
        want = reference(torch.tensor([tokens])).logits[0]
    cache = KVCache(ours.config, num_blocks=16, block_size=4, dtype=torch.float32)
    runner = ModelRunner(ours, cache)
    prompt_len = 11
    seq = Sequence("r", None, tokens[:prompt_len], SamplingParams(max_tokens=64), None)
    seq.blocks = torch.randperm(16, generator=torch.Generator().manual_seed(2)).tolist()  # scattered blocks
    runner.execute(StepPlan(prefills=[(seq, 4)]))  # first chunk: no cache read
    got = [runner.execute(StepPlan(prefills=[(seq, prompt_len - 4)])).logits[0]]  # reads chunk 1 from cache
    for token in tokens[prompt_len:]:
        seq.output_token_ids.append(token)
        got.append(runner.execute(StepPlan(decodes=[seq])).logits[0])
    got = torch.stack(got)
    assert (got - want[prompt_len - 1 :]).abs().max().item() < TOLERANCE


def test_batched_greedy_generation_equals_transformers_generate(hf_checkpoint):
    reference, path = hf_checkpoint
    batch = prompts([5, 17, 3, 48, 30, 9], seed=3)
    # small token budget: the long prompts are prefilled in chunks while others decode
    llm = LLM(
        path,
        "float32",
        skip_tokenizer_init=True,
        show_progress=False,
        max_num_batched_tokens=32,
        max_num_seqs=8,
    )
    ours = llm.generate(batch, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    for tokens, out in zip(batch, ours, strict=True):
        ids = torch.tensor([tokens])
        # an explicit mask: otherwise transformers masks every prompt token equal to pad_token_id
        want = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(tokens) :].tolist()
        assert out.outputs[0].token_ids == want
