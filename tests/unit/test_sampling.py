"""Sampling: seeds make requests reproducible wherever they run; top-k / top-p filter as documented."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from expertmesh.engine.sampler import sample, sample_row
from expertmesh.engine.sampling_params import SamplingParams

PROMPT = "The quick brown fox"


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)


def random_params(seed: int | None, max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(llm, prompt, params) -> list[int]:
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def run_on(engine, prompt, params) -> list[int]:
    """Add the request to `engine`, run everything there to the end, return this request's tokens."""
    rid = engine.add_request(prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                final = out
    return final.outputs[0].token_ids


# ---- through the engine ---------------------------------------------------------------------------


def test_same_seed_gives_same_tokens_alone_batched_and_chunked(pangu_llm, make_engine):
    alone = tokens(pangu_llm, PROMPT, random_params(123))
    assert tokens(pangu_llm, PROMPT, random_params(123)) == alone
    filtered = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=9, max_tokens=20, ignore_eos=True)
    filtered_alone = tokens(pangu_llm, PROMPT, filtered)
    outs = pangu_llm.generate(
        ["Once upon a time", PROMPT, "def main():", PROMPT, "import torch"],
        [random_params(7), random_params(123), greedy(10), filtered, random_params(None, max_tokens=5)],
        use_tqdm=False,
    )
    assert outs[1].outputs[0].token_ids == alone
    assert outs[3].outputs[0].token_ids == filtered_alone
    # A different engine with a tiny step budget, so the prompt is prefilled in pieces.
    engine = make_engine(max_num_seqs=2, max_num_batched_tokens=16)
    engine.add_request("Hello world, this is a test" * 3, random_params(5))
    assert run_on(engine, PROMPT, random_params(123)) == alone


def test_different_seeds_give_different_tokens(pangu_llm):
    runs = [tuple(tokens(pangu_llm, PROMPT, random_params(seed, max_tokens=24))) for seed in range(4)]
    assert len(set(runs)) == 4


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_is_greedy(pangu_llm, greedy_reference, temperature):
    params = SamplingParams(temperature=temperature, top_k=1, seed=3, max_tokens=16, ignore_eos=True)
    assert tokens(pangu_llm, PROMPT, params) == greedy_reference(PROMPT, 16).token_ids


@pytest.mark.parametrize("top_p", [1e-6, 1e-45, 2e-59, 1e-300])  # the last three are 0 in fp32
def test_tiny_top_p_is_greedy(pangu_llm, greedy_reference, top_p):
    """Found by schemathesis: a top_p that rounds to 0 in fp32 once dropped every token, and the
    sampler's failure stopped the engine."""
    params = random_params(11, top_p=top_p)
    assert tokens(pangu_llm, PROMPT, params) == greedy_reference(PROMPT, 16).token_ids


def test_sampling_without_a_seed_works_and_follows_the_engine_seed(pangu_llm, make_engine):
    outs = pangu_llm.generate([PROMPT, PROMPT], random_params(None, max_tokens=12), use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert len(c.token_ids) == 12 and c.finish_reason == "length"
        assert all(0 <= t < 2048 for t in c.token_ids)
    # Requests without a seed draw one from the engine's seed, so a fresh engine repeats itself.
    runs = {}
    for engine_seed, attempt in [(3, 0), (3, 1), (4, 0)]:
        engine = make_engine(seed=engine_seed, max_num_seqs=2, max_num_batched_tokens=64)
        runs[engine_seed, attempt] = run_on(engine, PROMPT, random_params(None))
    assert runs[3, 0] == runs[3, 1]
    assert runs[3, 0] != runs[4, 0]


# ---- sample_row on crafted logits -----------------------------------------------------------------


def draws(logits: list[float], n: int = 2000, seed: int = 0, **params) -> Counter:
    p = SamplingParams(**{"temperature": 1.0, **params})
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(logits)
    return Counter(sample_row(t.clone(), p, gen) for _ in range(n))


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def test_top_k_never_leaves_the_k_best():
    logits = [0.0, 4.0, -1.0, 5.0, 4.9, 0.5, 3.0, 4.8]  # best: 3, 4, 7, 1
    assert set(draws(logits, top_k=2)) == {3, 4}
    assert set(draws(logits, top_k=3)) == {3, 4, 7}
    assert set(draws(logits, top_k=1)) == {3}


def test_top_k_off_or_larger_than_the_vocabulary_keeps_everything():
    logits = [0.0] * 6
    for k in (-1, 0, 6, 100):
        assert set(draws(logits, n=500, top_k=k)) == set(range(6))


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [
        (0.45, {0}),
        (0.55, {0, 1}),
        (0.75, {0, 1}),
        (0.85, {0, 1, 2}),
        (0.97, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, nucleus):
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # put the tokens in shuffled positions: position order[i] has probs[i]
    logits = [0.0] * 4
    for rank, pos in enumerate(order):
        logits[pos] = math.log(probs[rank])
    got = draws(logits, n=3000, top_p=top_p)
    assert set(got) == {order[r] for r in nucleus}


def test_top_p_renormalises_the_nucleus():
    got = draws(log_probs([0.5, 0.3, 0.15, 0.05]), n=4000, top_p=0.75)
    share = got[0] / 4000  # 0.5 / 0.8 = 0.625 within the nucleus {0, 1}
    assert abs(share - 0.625) < 0.04


def test_top_k_then_top_p():
    # top_k=3 leaves 0.5, 0.3, 0.15 -> renormalised 0.526, 0.316, 0.158; top_p=0.8 then needs two.
    assert set(draws(log_probs([0.5, 0.3, 0.15, 0.05]), top_k=3, top_p=0.8)) == {0, 1}


def test_plain_sampling_follows_the_distribution():
    probs = [0.6, 0.25, 0.1, 0.05]
    got = draws(log_probs(probs), n=8000)
    for token, p in enumerate(probs):
        assert abs(got[token] / 8000 - p) < 0.025


def test_temperature_sharpens_and_flattens():
    logits = log_probs([0.6, 0.25, 0.1, 0.05])
    cold = draws(logits, n=2000, temperature=0.05)
    hot = draws(logits, n=4000, temperature=50.0)
    assert cold[0] == 2000
    assert all(abs(hot[t] / 4000 - 0.25) < 0.04 for t in range(4))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_temperature_near_zero_samples_the_best_token(top_p):
    # dividing the raw logits by 1e-40 overflows every one of them to inf: NaN probabilities
    logits = [30.0, 41.5, -7.0, 41.0]
    assert draws(logits, n=50, temperature=1e-40, top_p=top_p) == {1: 50}


def test_sample_row_leaves_the_logits_untouched():
    logits = torch.tensor([0.0, 4.0, -1.0, 5.0])
    before = logits.clone()
    sample_row(logits, SamplingParams(temperature=0.5, top_k=2, top_p=0.5), torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)


def test_batch_sample_uses_each_rows_own_generator():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=0),
        random_params(1),
        random_params(2),
        SamplingParams(temperature=0),
    ]

    def gens(seeds):
        return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]

    picked = sample(logits, params, gens([None, 42, 43, None]))
    assert picked[0] == int(logits[0].argmax()) and picked[3] == int(logits[3].argmax())
    # Row 1 alone, with the same generator seed, picks the same token.
    assert sample(logits[1:2], params[1:2], gens([42])) == picked[1:2]
    # Swapping rows (logits, params and generators together) swaps the picks.
    swapped = sample(logits[[2, 1, 0, 3]], [params[i] for i in (2, 1, 0, 3)], gens([43, 42, None, None]))
    assert swapped == [picked[2], picked[1], picked[0], picked[3]]


def test_a_row_whose_sampling_fails_fails_alone_and_the_engine_goes_on(make_engine, monkeypatch):
    """One request's sampling error ends that request with an error and frees its cache; the
    others in the same steps finish as they would alone, and the engine serves afterwards."""
    import expertmesh.engine.sampler as sampler

    real = sampler.sample_row

    def fails_for_seed_13(logits, p, generator):
        if p.seed == 13:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, p, generator)

    engine = make_engine()
    alone = {}
    for seed in (11, 12):
        ids = engine.add_request(PROMPT, random_params(seed))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    alone[seed] = out.outputs[0].token_ids
    monkeypatch.setattr(sampler, "sample_row", fails_for_seed_13)
    ids = {seed: engine.add_request(PROMPT, random_params(seed)) for seed in (11, 12, 13)}
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    failed = done[ids[13]]
    assert failed.outputs[0].finish_reason == "error" and "sampling failed for this request" in failed.error
    assert [done[ids[s]].outputs[0].token_ids for s in (11, 12)] == [alone[11], alone[12]]
    assert engine.allocator.num_free == engine.allocator.num_blocks
