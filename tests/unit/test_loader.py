"""Checkpoint loading: sharded and single files, dtypes, lazy expert groups, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh import LLM, CheckpointError, SamplingParams
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.checkpoint_maker import make_checkpoint
from expertmesh.model.experts import ExpertPartition
from expertmesh.model.loader import TensorStore, load_expert_group, load_expert_weights, load_model


@pytest.fixture(scope="module")
def pangu(tmp_path_factory):
    return make_checkpoint("pangu_pro_moe", "tiny", tmp_path_factory.mktemp("pangu"), progress=False)


def forward_logits(model, tokens):
    n = len(tokens)
    return model.logits(
        model(torch.tensor(tokens), ForwardBatch(torch.arange(n), prefills=[PrefillSpan(0, n)]))
    )


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_model(pangu, tmp_path):
    sharded = make_checkpoint(
        "pangu_pro_moe", "tiny", tmp_path / "sharded", max_shard_size=64 * 1024, progress=False
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    tokens = list(range(3, 40))
    torch.testing.assert_close(
        forward_logits(load_model(sharded), tokens), forward_logits(load_model(pangu), tokens), atol=0, rtol=0
    )


def test_bfloat16_checkpoint_and_dtype_choice(tmp_path, pangu):
    bf16 = make_checkpoint("pangu_pro_moe", "tiny", tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert load_model(bf16).embed_tokens.weight.dtype == torch.bfloat16  # auto follows the checkpoint
    assert load_model(bf16, "float32").embed_tokens.weight.dtype == torch.float32
    model = load_model(pangu, "bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    ref = forward_logits(load_model(pangu, "float32"), list(range(3, 20)))
    got = forward_logits(model, list(range(3, 20)))
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_one_expert_group_is_read_without_touching_the_others(pangu):
    cfg = json.loads((pangu / "config.json").read_text())
    experts, groups = cfg["num_experts"], cfg["num_experts_per_tok"]
    partition = ExpertPartition(experts, groups)
    group = 2
    store = TensorStore(pangu)
    from expertmesh.model.loader import load_config

    model_cfg = load_config(pangu)
    weights = load_expert_weights(store, model_cfg, 0, partition.experts_of(group), torch.float32)
    read = {int(key.split(".experts.")[1].split(".")[0]) for key in store.keys_read}
    assert read == set(partition.experts_of(group))
    assert len(store.keys_read) == 3 * partition.experts_per_group  # gate, up, down of each

    # the group's weights equal the same experts' slice of the full model's weights
    full = load_model(pangu).layers[0].mlp.backend.layers[0]
    torch.testing.assert_close(weights.gate_up, full.for_group(partition, group).gate_up)
    pool = load_expert_group(pangu, group, groups)
    assert sorted(pool) == list(model_cfg.moe_layers)


def test_missing_directory_and_files(tmp_path, pangu):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(tmp_path / "nope", show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(empty)
    no_weights = copy_checkpoint(pangu, tmp_path)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(no_weights)


def test_missing_shard_named_in_index(tmp_path):
    sharded = make_checkpoint("llama", "tiny", tmp_path / "s", max_shard_size=64 * 1024, progress=False)
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing safetensors file"):
        load_model(sharded)


def test_corrupt_safetensors(tmp_path, pangu):
    garbage = copy_checkpoint(pangu, tmp_path)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted"):
        load_model(garbage)
    truncated = tmp_path / "truncated"
    shutil.copytree(pangu, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(truncated)


def test_bad_config(tmp_path, pangu):
    ckpt = copy_checkpoint(pangu, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match="config.json: missing key 'hidden_size'"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(
        json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(cfg | {"num_experts": 15}))
    with pytest.raises(CheckpointError, match="divisible"):
        load_model(ckpt)


def rewrite_tensors(ckpt, change):
    tensors = load_file(ckpt / "model.safetensors")
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_tensor_wrong_shape_unsupported_dtype(tmp_path, pangu):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    ckpt = copy_checkpoint(pangu, tmp_path)
    rewrite_tensors(ckpt, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' not found"):
        load_model(ckpt)

    ckpt = copy_checkpoint(pangu, tmp_path / "shape")
    rewrite_tensors(ckpt, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{key}' has shape \[32, 63\]"):
        load_model(ckpt)

    ckpt = copy_checkpoint(pangu, tmp_path / "dtype")
    rewrite_tensors(ckpt, lambda t: t.update({key: t[key].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' has unsupported dtype torch.int8"):
        load_model(ckpt)

    with pytest.raises(CheckpointError, match="dtype 'float64' is not supported"):
        LLM(pangu, "float64", show_progress=False)


def test_missing_tokenizer_is_named_and_can_be_skipped(tmp_path, pangu):
    ckpt = copy_checkpoint(pangu, tmp_path)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(
        CheckpointError, match="neither tokenizer.json nor a SentencePiece tokenizer.model found"
    ):
        LLM(ckpt, show_progress=False)
    llm = LLM(ckpt, skip_tokenizer_init=True, show_progress=False)
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3
