"""Speculative decoding (n-gram proposals): the two pure decisions, and the bar that matters,
greedy output with speculation token for token equal to plain decoding."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from expertmesh.engine.config import EngineConfig, SpeculativeConfig
from expertmesh.engine.sampler import target_probs
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.speculative import accept_greedy, accept_sampled, propose_ngram

# ---- the decisions (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "k", "ngram_min", "want"),
    [
        ([1, 2, 3, 4, 9, 1, 2, 3], 3, 1, [4, 9, 1]),  # the trailing 3-gram seen before
        ([1, 2, 3, 4, 9, 1, 2, 3], 1, 1, [4]),  # at most k
        ([5, 6, 7], 2, 1, []),  # nothing repeats
        ([7, 1, 7], 2, 1, [1, 7]),  # a 1-gram
        ([1, 2, 1, 3, 1], 2, 2, []),  # (3, 1) never came before: below ngram_min
        ([4, 8, 1, 5, 9, 1], 2, 1, [5, 9]),  # the latest of equally long matches
        ([1, 2, 9, 7, 2, 8, 1, 2], 2, 1, [9, 7]),  # the longest match, not the latest
        ([9, 5, 6, 5, 6], 4, 1, [5, 6, 5, 6]),  # a short period: the copy runs on into itself
        ([3], 2, 1, []),
        ([], 2, 1, []),
    ],
)
def test_ngram_proposals(tokens, k, ngram_min, want):
    assert propose_ngram(tokens, k, ngram_max=4, ngram_min=ngram_min) == want


def test_greedy_acceptance_keeps_the_model_picks_and_adds_one():
    assert accept_greedy([4, 9, 1], [4, 9, 5, 6]) == [4, 9, 5]  # the third was not its pick
    assert accept_greedy([4, 9], [8, 1, 2]) == [8]  # none kept: one token, as plain decoding
    assert accept_greedy([4, 9], [4, 9, 3]) == [4, 9, 3]  # all kept, and the pick after them


def test_bad_settings_name_the_field():
    with pytest.raises(ValidationError, match="num_tokens"):
        SpeculativeConfig(num_tokens=0)
    with pytest.raises(ValidationError, match=r"ngram_min \(5\) must not exceed ngram_max \(4\)"):
        SpeculativeConfig(ngram_min=5)
    with pytest.raises(ValidationError, match="method"):
        EngineConfig(speculative={"method": "mtp"})


# ---- the engine -----------------------------------------------------------------------------------


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens, **kw)


def run_all(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    finals = {}
    while engine.has_unfinished_requests():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    return [finals[i] for i in ids]


def repeating(n: int, period: int, seed: int) -> list[int]:
    """A prompt that repeats itself, where lookup finds proposals from the start."""
    unit = torch.randint(3, 2048, (period,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (unit * (n // period + 1))[:n]


@pytest.fixture(scope="module")
def engines(make_engine):
    spec = {"num_tokens": 4}
    return (
        make_engine(speculative=spec, max_num_seqs=8, max_num_batched_tokens=128),
        make_engine(max_num_seqs=8, max_num_batched_tokens=128),
    )


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 40])
def test_greedy_tokens_equal_plain_decoding(engines, max_tokens):
    speculative, plain = engines
    prompts = [repeating(30, 7, 1), repeating(45, 5, 2), repeating(20, 20, 3), repeating(33, 11, 4)]
    before = speculative.speculative_stats()
    got = run_all(speculative, prompts, greedy(max_tokens))
    want = run_all(plain, prompts, greedy(max_tokens))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in got)
    stats = speculative.speculative_stats()
    if max_tokens > 2:  # room for proposals: some were made, and some kept
        assert stats["proposed"] > before["proposed"] and stats["accepted"] > before["accepted"]


def test_text_and_stop_strings_are_those_of_plain_decoding(engines, pangu_llm):
    speculative, plain = engines
    prompt = "def f(x):\n    return x\n" * 6
    reference = run_all(plain, [prompt], greedy(30))[0].outputs[0]
    stop = reference.text[8:12] if len(reference.text) > 12 else None
    params = greedy(30, stop=[stop]) if stop else greedy(30)
    got = run_all(speculative, [prompt], params)[0].outputs[0]
    want = run_all(plain, [prompt], params)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)


def test_sampled_requests_are_speculated_and_reproducible_by_seed(engines):
    speculative, _ = engines
    # a low temperature (the tiny random model's logits are nearly flat): it repeats itself as
    # greedy decoding does, so lookup finds proposals
    params = SamplingParams(temperature=0.05, seed=5, max_tokens=20, ignore_eos=True)
    prompt = repeating(40, 6, 9)
    before = speculative.speculative_stats()["proposed"]
    first = run_all(speculative, [prompt], params)[0].outputs[0].token_ids
    assert speculative.speculative_stats()["proposed"] > before
    assert len(first) == 20 and run_all(speculative, [prompt], params)[0].outputs[0].token_ids == first


# ---- speculative sampling keeps the distribution --------------------------------------------------


def first_token_counts(logits, proposals, params, draws: int) -> torch.Tensor:
    counts = torch.zeros(logits.shape[1])
    for seed in range(draws):
        tokens = accept_sampled(logits, proposals, params, torch.Generator().manual_seed(seed))
        counts[tokens[0]] += 1
    return counts


@pytest.mark.parametrize(
    ("proposal", "filters"),
    [
        (1, {}),  # a likely proposal
        (4, {}),  # an unlikely one
        (4, {"top_k": 3}),  # one that top_k leaves out: always refused
        (0, {"top_p": 0.7}),  # the best one, inside the nucleus
    ],
)
def test_the_first_token_is_distributed_as_plain_sampling_draws_it(proposal, filters):
    """On a 6-token vocabulary, 6000 draws of the first token a verified span yields match the
    distribution sample_row draws from, within 4.5 binomial standard deviations per token."""
    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -0.5, -3.0], [0.3, 0.1, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.9, **filters)
    draws = 6000
    counts = first_token_counts(logits, [proposal], params, draws)
    want = target_probs(logits[0], params)
    spread = 4.5 * torch.sqrt(draws * want * (1 - want)) + 1
    assert torch.all((counts - draws * want).abs() <= spread), (counts / draws, want)
    if filters.get("top_k") == 3:
        assert counts[proposal] == 0


def test_a_kept_proposal_is_followed_by_a_draw_from_the_next_row():
    # the proposal is certain (one logit far above the rest): kept, and the second token is the
    # next row's draw, with that row's distribution
    logits = torch.tensor([[0.0, 40.0, 0.0], [1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0)
    seconds = torch.zeros(3)
    for seed in range(3000):
        tokens = accept_sampled(logits, [1], params, torch.Generator().manual_seed(seed))
        assert tokens[0] == 1 and len(tokens) == 2
        seconds[tokens[1]] += 1
    want = target_probs(logits[1], params)
    assert torch.all((seconds / 3000 - want).abs() < 0.04), (seconds / 3000, want)


def test_with_the_prefix_cache_and_a_small_step_budget(make_engine):
    # budget 24 for 8 sequences: proposals are cut to what the step has room for
    config = dict(max_num_seqs=8, max_num_batched_tokens=24)
    speculative = make_engine(speculative={"num_tokens": 6}, **config)
    plain = make_engine(**config)
    prompts = [repeating(40, 9, s) for s in range(8)]
    got = run_all(speculative, prompts, greedy(24))
    assert [o.outputs[0].token_ids for o in got] == [
        o.outputs[0].token_ids for o in run_all(plain, prompts, greedy(24))
    ]
    assert speculative.allocator.num_free == speculative.allocator.num_blocks
