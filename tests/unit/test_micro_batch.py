"""Ping-pong micro-batches: where a step is cut, what each half carries, and that cutting changes no token."""

import pytest
import torch

import expertmesh.model.transformer as transformer_module
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.attention import ForwardBatch, PrefillSpan
from expertmesh.model.experts import ColocatedExpertBackend
from expertmesh.model.loader import load_config, load_model
from expertmesh.model.micro_batch import plan_micro_batches, split_forward_batch, split_row
from expertmesh.model.tokenizer_files import load_tokenizer, stop_token_ids


def step(num_decode: int, chunks: list[int], cached: int = 0) -> tuple[ForwardBatch, int]:
    """A flat step as the model runner lays it out: decode rows, then prefill chunks."""
    spans, row = [], num_decode
    for n in chunks:
        spans.append(PrefillSpan(row, row + n, cached=cached))
        row += n
    width = 5
    return (
        ForwardBatch(
            positions=torch.arange(row),
            slot_mapping=torch.arange(100, 100 + row),
            num_decode=num_decode,
            decode_slots=torch.arange(num_decode * width).view(num_decode, width) if num_decode else None,
            decode_lengths=torch.full((num_decode,), width) if num_decode else None,
            prefills=spans,
        ),
        row,
    )


@pytest.mark.parametrize(
    "num_decode,chunks,want",
    [
        (8, [], 4),  # decode only: two halves
        (7, [], 3),  # odd: the lower cut on a tie
        (1, [], None),  # one row cannot be cut
        (0, [10, 4, 16], 14),  # prefill only: between chunks, closest to the middle
        (0, [30], None),  # one prefill chunk is never cut
        (4, [16, 4], 4),  # mixed: 4 and 20 are equally far from 12; the lower wins
        (2, [3, 3], 5),  # mixed: between the two chunks
        (6, [40], 6),  # a long chunk stays whole: all decodes in A, the chunk in B
    ],
)
def test_split_row_cuts_decodes_anywhere_and_prefills_only_between_chunks(num_decode, chunks, want):
    batch, tokens = step(num_decode, chunks)
    assert split_row(batch, tokens) == want


def test_plan_micro_batches_only_for_a_concurrent_backend_and_a_large_step():
    batch, tokens = step(64, [])
    assert plan_micro_batches(batch, tokens, 2, 32, concurrent_backend=True) == 32
    assert plan_micro_batches(batch, tokens, 1, 32, concurrent_backend=True) is None  # switched off
    assert plan_micro_batches(batch, tokens, 2, 32, concurrent_backend=False) is None  # colocated
    assert plan_micro_batches(batch, tokens, 2, 65, concurrent_backend=True) is None  # too small


def test_split_forward_batch_mixed_step_halves_are_self_contained():
    batch, tokens = step(3, [4, 5], cached=2)
    first, second = split_forward_batch(batch, 7)  # 3 decodes + the first chunk | the second chunk
    assert first.positions.tolist() == list(range(7)) and second.positions.tolist() == [7, 8, 9, 10, 11]
    assert first.slot_mapping.tolist() == list(range(100, 107))
    assert second.slot_mapping.tolist() == list(range(107, 112))
    assert first.num_decode == 3 and torch.equal(first.decode_slots, batch.decode_slots)
    assert second.num_decode == 0 and second.decode_slots is None and second.decode_lengths is None
    assert [(s.start, s.end, s.cached) for s in first.prefills] == [(3, 7, 2)]
    assert [(s.start, s.end, s.cached) for s in second.prefills] == [(0, 5, 2)]  # rows renumbered


def test_split_forward_batch_inside_the_decode_rows():
    batch, _ = step(4, [3])
    first, second = split_forward_batch(batch, 1)
    assert first.num_decode == 1 and first.prefills == []
    assert first.decode_lengths.tolist() == [5] and first.decode_mask.shape[0] == 1
    assert second.num_decode == 3 and second.decode_slots.tolist() == batch.decode_slots[1:].tolist()
    assert [(s.start, s.end) for s in second.prefills] == [(3, 6)]


def test_split_forward_batch_refuses_to_cut_a_prefill_chunk():
    batch, _ = step(0, [6])
    with pytest.raises(ValueError, match="cuts a prefill chunk"):
        split_forward_batch(batch, 3)


class ConcurrentColocated(ColocatedExpertBackend):
    """The colocated experts, claiming to run elsewhere so the engine takes the micro-batch path."""

    concurrent = True


PROMPTS = ["def main():", "import os\nimport sys", "class Pool:", "x = [i for i in", "while True:"]


def run_staggered(engine: LLMEngine) -> list[list[int]]:
    """Two prompts first, the rest while those decode: steps that mix decodes and prefill chunks."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:2]]
    done, steps = {}, 0
    while engine.has_unfinished_requests() or len(ids) < len(PROMPTS):
        if steps == 2:
            ids += [engine.add_request(p, params) for p in PROMPTS[2:]]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
    return [done[i] for i in ids]


@pytest.mark.parametrize("arch", ["pangu_pro_moe", "qwen2_moe"])
def test_two_micro_batches_give_the_same_greedy_tokens_as_one(tiny_checkpoint, arch, monkeypatch):
    path = tiny_checkpoint(arch)
    cfg = load_config(path)
    outputs = {}
    splits = []
    real_split = transformer_module.split_forward_batch

    def counting_split(batch, row):
        splits.append(row)
        return real_split(batch, row)

    monkeypatch.setattr(transformer_module, "split_forward_batch", counting_split)
    for micro_batches in (1, 2):
        model = load_model(path)
        model.set_expert_backend(ConcurrentColocated(model.moe_blocks[0].backend.layers))
        config = EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=16, micro_batches=micro_batches, micro_batch_min_tokens=2
        )
        engine = LLMEngine(model, load_tokenizer(path), stop_token_ids(path, cfg.eos_token_ids), config)
        outputs[micro_batches] = run_staggered(engine)
        if micro_batches == 1:
            assert splits == []
    assert len(splits) > 5  # the overlapped run really cut its steps
    assert outputs[2] == outputs[1]
