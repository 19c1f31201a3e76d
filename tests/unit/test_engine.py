"""LLMEngine behaviour on a real tiny Pangu checkpoint: continuous batching, chunked prefill,
KV cache admission, cancellation, stop conditions, streaming and request validation."""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.detokenizer import PROMPT_CONTEXT_TOKENS
from expertmesh.engine.kv_cache import blocks_for, bytes_per_token
from expertmesh.engine.llm_engine import LLMEngine, warm_up_lengths
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scheduler import StepPlan, plan_step
from expertmesh.engine.sequence import RequestOutput, Sequence, SequenceStatus
from expertmesh.errors import InvalidRequestError, QueueFullError

STOP_PROMPT = "The quick brown fox"


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens, **kw)


def peek_plan(engine: LLMEngine) -> StepPlan:
    """What the engine's next step will run, computed without changing anything."""
    s = engine.scheduler
    return plan_step(
        list(s.running), list(s.waiting), engine.allocator.num_free, engine.config, s.blocks_needed
    )


def running_ids(engine: LLMEngine) -> list[str]:
    return [s.request_id for s in engine.scheduler.running]


def waiting_ids(engine: LLMEngine) -> list[str]:
    return [s.request_id for s in engine.scheduler.waiting]


def drain(engine: LLMEngine, final: dict[str, RequestOutput] | None = None) -> dict[str, RequestOutput]:
    final = {} if final is None else final
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish its requests")


def token_prompt(n: int, seed: int = 0) -> list[int]:
    """n ordinary (non-special) token ids."""
    return torch.randint(3, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.running == [] and len(engine.scheduler.waiting) == 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


# ---- continuous batching --------------------------------------------------------------------------


def test_requests_join_the_running_batch_between_steps_and_leave_when_done(make_engine, greedy_reference):
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=64)
    requests = {  # id: (prompt, max_tokens, step before which it is added)
        "a": ("The quick brown fox", 12, 0),
        "b": ("Once upon a time", 5, 2),
        "c": (token_prompt(9), 4, 4),
    }
    added: set[str] = set()
    finished: dict[str, RequestOutput] = {}
    tokens_of_a = []
    for step in range(100):
        for rid, (prompt, n, at) in requests.items():
            if at == step:
                engine.add_request(prompt, greedy(n), request_id=rid)
                added.add(rid)
        if not engine.has_unfinished_requests():
            break
        plan = peek_plan(engine)
        if step in (2, 4):  # a newcomer is admitted while the others decode in the same step
            newcomer = "b" if step == 2 else "c"
            assert [s.request_id for s in plan.admitted] == [newcomer]
            assert "a" in [s.request_id for s in plan.decodes]
        outs = engine.step()
        for out in outs:
            if out.finished:
                finished[out.request_id] = out
            if out.request_id == "a":
                tokens_of_a.append(len(out.outputs[0].token_ids))
        # A request runs from the step it was added in until the step it finished in.
        expected = [rid for rid in requests if rid in added and rid not in finished]
        assert running_ids(engine) == expected, f"step {step}"
        assert waiting_ids(engine) == []
    assert sorted(finished) == ["a", "b", "c"]
    # "a" gained exactly one token every step, newcomers or not.
    assert tokens_of_a == list(range(1, 13))
    for rid, (prompt, n, _) in requests.items():
        out = finished[rid].outputs[0]
        ref = greedy_reference(prompt, n)
        assert out.token_ids == ref.token_ids, rid
        assert out.text == ref.text, rid
        assert out.finish_reason == "length"
    assert_idle(engine)


def test_batched_greedy_outputs_match_solo_runs(pangu_llm, greedy_reference):
    prompts = ["Hello world, this is a test", "def main():", token_prompt(30, seed=1), "In the beginning"]
    params = [greedy(6), greedy(10), greedy(3), greedy(8)]
    outs = pangu_llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [pangu_llm.engine.tokenize(p)[1] for p in prompts]
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.finished
        assert out.outputs[0].token_ids == greedy_reference(prompt, p.max_tokens).token_ids
    assert_idle(pangu_llm.engine)


# ---- chunked prefill ------------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_while_running_sequence_keeps_decoding(
    make_engine, greedy_reference
):
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=32)
    long_prompt = token_prompt(200, seed=2)
    engine.add_request("Once upon a time", greedy(16), request_id="short")
    engine.step()
    assert running_ids(engine) == ["short"]
    engine.add_request(long_prompt, greedy(5), request_id="long")

    chunks = []
    final: dict[str, RequestOutput] = {}
    short_tokens = 1
    while True:
        plan = peek_plan(engine)
        prefill = {s.request_id: n for s, n in plan.prefills}
        if "long" not in prefill:
            break
        assert plan.num_tokens <= 32
        assert [s.request_id for s in plan.decodes] == ["short"]
        long_seq = next(s for s, _ in plan.prefills if s.request_id == "long")
        before = long_seq.num_computed_tokens
        outs = {o.request_id: o for o in engine.step()}
        chunks.append(long_seq.num_computed_tokens - before)
        assert chunks[-1] == prefill["long"]
        # The running sequence decoded one token in this step, too.
        short_tokens += 1
        assert len(outs["short"].outputs[0].token_ids) == short_tokens
        # The long prompt yields its first token only with its last chunk.
        assert ("long" in outs) == (long_seq.num_computed_tokens == len(long_prompt))
        for o in outs.values():
            if o.finished:
                final[o.request_id] = o

    assert chunks == [31] * 6 + [14]  # 32-token budget minus the one decode
    drain(engine, final)
    assert final["long"].outputs[0].token_ids == greedy_reference(long_prompt, 5).token_ids
    assert final["short"].outputs[0].token_ids == greedy_reference("Once upon a time", 16).token_ids
    assert_idle(engine)


def test_chunked_prefill_of_several_prompts_matches_unchunked(make_engine, greedy_reference):
    engine = make_engine(max_num_seqs=3, max_num_batched_tokens=16)
    prompts = [token_prompt(40, seed=3), token_prompt(23, seed=4), "Hello world, this is a test"]
    for i, p in enumerate(prompts):
        engine.add_request(p, greedy(4), request_id=str(i))
    final = drain(engine)
    for i, p in enumerate(prompts):
        assert final[str(i)].outputs[0].token_ids == greedy_reference(p, 4).token_ids
    assert_idle(engine)


# ---- plan_step ------------------------------------------------------------------------------------

BLOCK = 16


def seq(rid: str, prompt_len: int, max_tokens: int = 16, computed: int | None = None) -> Sequence:
    """A sequence; with `computed` set it is running with that many tokens in the cache."""
    s = Sequence(rid, None, [5] * prompt_len, SamplingParams(max_tokens=max_tokens), None)
    if computed is not None:
        s.status = SequenceStatus.RUNNING
        s.num_computed_tokens = computed
        if computed >= prompt_len:  # decoding: it has sampled tokens already
            s.output_token_ids = [7] * (computed - prompt_len + 1)
    return s


def need(s: Sequence) -> int:
    return blocks_for(len(s.prompt_token_ids) + s.params.max_tokens, BLOCK)


def cfg(**kw) -> EngineConfig:
    return EngineConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 32, **kw})


def ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_plan_decodes_every_running_sequence_and_gives_the_rest_of_the_budget_to_prompts():
    running = [seq("d1", 4, computed=4), seq("d2", 8, computed=10), seq("d3", 3, computed=3)]
    waiting = [seq("w1", 100), seq("w2", 5)]
    plan = plan_step(running, waiting, 1000, cfg(), need)
    assert ids(plan.decodes) == ["d1", "d2", "d3"]
    assert [(s.request_id, n) for s, n in plan.prefills] == [("w1", 29)]
    assert ids(plan.admitted) == ["w1"]
    assert plan.num_tokens == 32


def test_plan_continues_running_prefills_before_admitting_new_prompts():
    running = [seq("d", 4, computed=4), seq("p", 100, computed=40)]
    plan = plan_step(running, [seq("w", 4)], 1000, cfg(max_num_batched_tokens=64), need)
    assert ids(plan.decodes) == ["d"]
    assert [(s.request_id, n) for s, n in plan.prefills] == [("p", 60), ("w", 3)]
    assert plan.num_tokens == 64
    # With the budget used up by the running prefill, nobody joins.
    plan = plan_step(running, [seq("w", 4)], 1000, cfg(max_num_batched_tokens=32), need)
    assert [(s.request_id, n) for s, n in plan.prefills] == [("p", 31)]
    assert plan.admitted == []


def test_plan_fills_the_budget_with_several_short_prompts_in_arrival_order():
    waiting = [seq("a", 10), seq("b", 10), seq("c", 10), seq("d", 10)]
    plan = plan_step([], waiting, 1000, cfg(), need)
    assert [(s.request_id, n) for s, n in plan.prefills] == [("a", 10), ("b", 10), ("c", 10), ("d", 2)]
    assert ids(plan.admitted) == ["a", "b", "c", "d"]


def test_plan_respects_max_num_seqs():
    running = [seq("r1", 4, computed=4), seq("r2", 4, computed=4)]
    waiting = [seq("w1", 2), seq("w2", 2), seq("w3", 2)]
    plan = plan_step(running, waiting, 1000, cfg(max_num_seqs=3), need)
    assert ids(plan.admitted) == ["w1"]
    plan = plan_step(running + [seq("r3", 4, computed=4)], waiting, 1000, cfg(max_num_seqs=3), need)
    assert plan.admitted == [] and ids(plan.decodes) == ["r1", "r2", "r3"]


def test_plan_is_first_come_first_served_even_when_a_later_request_would_fit():
    big, small = seq("big", 100, max_tokens=60), seq("small", 4, max_tokens=4)  # 10 blocks, 1 block
    plan = plan_step([], [big, small], 5, cfg(), need)
    assert plan.admitted == [] and plan.empty


def test_plan_accounts_blocks_across_admissions():
    waiting = [seq(f"w{i}", 4, max_tokens=60) for i in range(3)]  # 4 blocks each
    assert ids(plan_step([], waiting, 10, cfg(), need).admitted) == ["w0", "w1"]
    assert ids(plan_step([], waiting, 12, cfg(), need).admitted) == ["w0", "w1", "w2"]
    assert ids(plan_step([], waiting, 3, cfg(), need).admitted) == []


def test_plan_step_changes_nothing():
    running = [seq("d", 4, computed=4), seq("p", 100, computed=40)]
    waiting = deque([seq("w", 4)])
    plan_step(running, waiting, 1000, cfg(max_num_batched_tokens=64), need)
    assert [s.num_computed_tokens for s in running] == [4, 40]
    assert ids(waiting) == ["w"] and waiting[0].status is SequenceStatus.WAITING
    assert plan_step([], [], 1000, cfg(), need).empty


def test_config_requires_a_budget_that_covers_every_decode():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)


# ---- KV cache admission ---------------------------------------------------------------------------


def small_cache_engine(make_engine, pangu_llm, num_blocks: int = 8, block_size: int = 4) -> LLMEngine:
    model = pangu_llm.engine.model
    per_token = bytes_per_token(model.config, model.embed_tokens.weight.dtype)
    engine = make_engine(
        block_size=block_size,
        kv_cache_memory_bytes=num_blocks * block_size * per_token,
        max_num_seqs=4,
        max_num_batched_tokens=64,
    )
    assert engine.allocator.num_blocks == num_blocks
    return engine


def test_request_waits_for_cache_blocks_and_runs_once_others_finish(make_engine, pangu_llm, greedy_reference):
    engine = small_cache_engine(make_engine, pangu_llm)  # 8 blocks of 4 tokens
    reqs = {  # 4-token prompts; blocks = (4 + max_tokens) / 4
        "a": (token_prompt(4, seed=10), 4),  # 2 blocks
        "b": (token_prompt(4, seed=11), 12),  # 4 blocks
        "c": (token_prompt(4, seed=12), 8),  # 3 blocks: does not fit next to a and b
        "d": (token_prompt(4, seed=13), 4),  # 2 blocks: would fit, but must not overtake c
    }
    for rid, (prompt, n) in reqs.items():
        engine.add_request(prompt, greedy(n), request_id=rid)
    final: dict[str, RequestOutput] = {}
    admitted_at: dict[str, int] = {}
    finished_at: dict[str, int] = {}
    for step in range(100):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
                finished_at[out.request_id] = step
        for rid in running_ids(engine):
            admitted_at.setdefault(rid, step)
        if step == 0:
            assert running_ids(engine) == ["a", "b"]
            assert waiting_ids(engine) == ["c", "d"]
            assert engine.allocator.num_free == 2
        used = sum(len(s.blocks) for s in engine.scheduler.running)
        assert used + engine.allocator.num_free == 8
    assert admitted_at["c"] == finished_at["a"] + 1  # joins as soon as a's blocks come back
    assert admitted_at["d"] > admitted_at["c"]
    assert admitted_at["d"] == min(finished_at["b"], finished_at["c"]) + 1
    for rid, (prompt, n) in reqs.items():
        assert final[rid].outputs[0].token_ids == greedy_reference(prompt, n).token_ids, rid
    assert_idle(engine)


def test_request_that_can_never_fit_the_cache_is_refused(make_engine, pangu_llm):
    engine = small_cache_engine(make_engine, pangu_llm)
    with pytest.raises(InvalidRequestError, match=r"needs 11 KV cache blocks.*max_tokens=40.*has 8"):
        engine.add_request(token_prompt(4), greedy(40))
    assert not engine.has_unfinished_requests()
    # The whole cache is fine.
    engine.add_request(token_prompt(4), greedy(28))
    assert len(drain(engine)) == 1
    assert_idle(engine)


# ---- cancellation ---------------------------------------------------------------------------------


def test_abort_frees_blocks_at_once_and_stops_output(make_engine, greedy_reference):
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request("The quick brown fox", greedy(20), request_id="victim")
    engine.add_request("Once upon a time", greedy(12), request_id="other")
    for _ in range(3):
        engine.step()
    victim = next(s for s in engine.scheduler.running if s.request_id == "victim")
    held = len(victim.blocks)
    assert held > 0
    free_before = engine.allocator.num_free

    assert engine.abort_request("victim") is True
    assert engine.allocator.num_free == free_before + held
    assert running_ids(engine) == ["other"]
    assert victim.finish_reason == "abort"
    assert engine.abort_request("victim") is False  # already gone
    assert engine.abort_request("never-seen") is False

    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "victim"
            if out.finished:
                final[out.request_id] = out
    assert len(victim.output_token_ids) == 3
    assert final["other"].outputs[0].token_ids == greedy_reference("Once upon a time", 12).token_ids
    assert_idle(engine)


def test_abort_of_waiting_and_prefilling_requests(make_engine):
    engine = make_engine(max_num_seqs=1, max_num_batched_tokens=16)
    engine.add_request(token_prompt(100), greedy(4), request_id="prefilling")
    engine.add_request("Once upon a time", greedy(4), request_id="waiting")
    engine.step()
    assert running_ids(engine) == ["prefilling"] and waiting_ids(engine) == ["waiting"]
    assert engine.scheduler.running[0].is_prefilling
    assert engine.abort_request("waiting") is True
    assert waiting_ids(engine) == []
    assert engine.abort_request("prefilling") is True
    assert_idle(engine)
    assert engine.step() == []


def test_a_request_is_accepted_while_a_step_runs_and_joins_the_next_step(make_engine, monkeypatch):
    # A server's event loop calls add_request: it must not wait for the running step (a
    # 1000-token prefill step takes about a second here), or every arrival behind it waits too.
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request("Once upon a time", greedy(4), request_id="first")
    inside_step, release_step = threading.Event(), threading.Event()
    execute = engine.runner.execute

    def held_execute(plan):
        inside_step.set()
        assert release_step.wait(timeout=30)
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", held_execute)
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    try:
        assert inside_step.wait(timeout=30)
        adder = threading.Thread(target=engine.add_request, args=("The quick brown fox", greedy(4), "second"))
        adder.start()
        adder.join(timeout=10)
        assert not adder.is_alive(), "add_request waited for the running step"
        assert waiting_ids(engine) == ["second"]
    finally:
        release_step.set()
        stepper.join(timeout=30)
    monkeypatch.setattr(engine.runner, "execute", execute)
    engine.step()
    assert running_ids(engine) == ["first", "second"]
    drain(engine)
    assert_idle(engine)


# ---- stop conditions ------------------------------------------------------------------------------


def first_stop(llm, token_ids: list[int], stops: list[str]) -> tuple[int, int, str]:
    """(tokens generated, index in text, stop string) at which greedy decoding of STOP_PROMPT meets
    a stop string. The text is decoded after the prompt's last tokens, as the engine decodes a
    continuation (a SentencePiece decoder drops the leading space of a text on its own)."""
    tokenizer = llm.get_tokenizer()
    context = llm.engine.tokenize(STOP_PROMPT)[1][-PROMPT_CONTEXT_TOKENS:]
    for k in range(1, len(token_ids) + 1):
        text = tokenizer.decode(context + token_ids[:k])[len(tokenizer.decode(context)) :]
        hits = sorted((text.find(s), s) for s in stops if s in text)
        if hits:
            return k, hits[0][0], hits[0][1]
    raise AssertionError("no stop string in the reference output")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("span", [(4, 10), (8, 15), (27, 33)])  # token-aligned, across tokens, seen before
def test_stop_string_truncates_output(pangu_llm, greedy_reference, span, include):
    ref = greedy_reference(STOP_PROMPT, 24)
    stop = ref.text[span[0] : span[1]]
    assert stop.strip()
    k, index, _ = first_stop(pangu_llm, ref.token_ids, [stop])
    out = pangu_llm.generate(STOP_PROMPT, greedy(24, stop=[stop], include_stop_str_in_output=include), False)
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == ref.token_ids[:k]
    assert c.text == (ref.text[: index + len(stop)] if include else ref.text[:index])
    assert c.text.endswith(stop) if include else stop not in c.text
    assert_idle(pangu_llm.engine)


def test_earliest_of_several_stop_strings_wins(pangu_llm, greedy_reference):
    ref = greedy_reference(STOP_PROMPT, 24)
    late, early = ref.text[30:36], ref.text[10:13]
    k, index, which = first_stop(pangu_llm, ref.token_ids, [late, early])
    assert which == early
    c = pangu_llm.generate(STOP_PROMPT, greedy(24, stop=[late, early]), use_tqdm=False)[0].outputs[0]
    assert (c.stop_reason, c.text, c.token_ids) == (early, ref.text[:index], ref.token_ids[:k])


def test_eos_token_stops_unless_ignored(make_engine, greedy_reference):
    ref = greedy_reference(STOP_PROMPT, 16).token_ids
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # first token not seen before
    eos = ref[k]
    engine = make_engine(eos_token_ids={eos})
    engine.add_request(STOP_PROMPT, SamplingParams(temperature=0, max_tokens=16), request_id="eos")
    engine.add_request(STOP_PROMPT, greedy(16), request_id="ignore")
    final = drain(engine)
    c = final["eos"].outputs[0]
    assert c.token_ids == ref[: k + 1]  # the EOS token is reported, then nothing
    assert c.finish_reason == "stop" and c.stop_reason is None
    c = final["ignore"].outputs[0]
    assert c.token_ids == ref and c.finish_reason == "length"


def test_checkpoint_eos_ids_are_loaded(pangu_llm):
    eos = pangu_llm.engine.eos_token_ids
    assert eos and all(0 <= t < pangu_llm.engine.model.config.vocab_size for t in eos)
    tokenizer = pangu_llm.get_tokenizer()
    assert tokenizer.token_to_id("[unused10]") in eos  # Pangu's end of turn


def test_stop_token_ids_stop_even_with_ignore_eos(pangu_llm, greedy_reference):
    ref = greedy_reference(STOP_PROMPT, 16).token_ids
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])
    c = pangu_llm.generate(STOP_PROMPT, greedy(16, stop_token_ids=[ref[k]]), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == ref[: k + 1]
    assert c.finish_reason == "stop" and c.stop_reason == ref[k]


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_length_with_exactly_that_many_tokens(pangu_llm, max_tokens):
    c = pangu_llm.generate(STOP_PROMPT, greedy(max_tokens), use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) == max_tokens
    assert c.finish_reason == "length" and c.stop_reason is None


def test_generation_stops_at_the_context_length(make_engine):
    engine = make_engine(max_model_len=32)
    engine.add_request(token_prompt(28), greedy(40))  # more than the context: capped, not refused
    (out,) = drain(engine).values()
    assert len(out.outputs[0].token_ids) == 4
    assert out.outputs[0].finish_reason == "length"
    assert_idle(engine)


# ---- streaming ------------------------------------------------------------------------------------


def collect_stream(stream) -> tuple[dict[str, list[RequestOutput]], list[str]]:
    by_id: dict[str, list[RequestOutput]] = {}
    order = []
    for out in stream:
        if out.request_id not in by_id:
            order.append(out.request_id)
        by_id.setdefault(out.request_id, []).append(out)
    return by_id, order


def test_stream_deltas_add_up_to_the_final_output(pangu_llm, greedy_reference):
    prompts = ["The quick brown fox", "def main():", "1, 2, 3, 4,"]
    by_id, _ = collect_stream(pangu_llm.generate_stream(prompts, greedy(12)))
    assert len(by_id) == 3
    for outs, prompt in zip(by_id.values(), prompts, strict=True):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        text, tokens = "", []
        for o in outs:
            c = o.outputs[0]
            text += c.delta_text
            tokens += c.delta_token_ids
            assert c.text == text and c.token_ids == tokens
        ref = greedy_reference(prompt, 12)
        assert (text, tokens) == (ref.text, ref.token_ids)
        assert len(outs) == 12  # one report per generated token
    assert_idle(pangu_llm.engine)


@pytest.mark.parametrize("include", [False, True])
def test_stream_never_shows_a_stop_string(pangu_llm, greedy_reference, include):
    ref = greedy_reference(STOP_PROMPT, 24)
    # The first stop string spans three tokens, so its first characters arrive two tokens early.
    stops = [ref.text[8:15], ref.text[35:40]]
    _, index, first = first_stop(pangu_llm, ref.token_ids, stops)
    params = greedy(24, stop=stops, include_stop_str_in_output=include)
    by_id, _ = collect_stream(pangu_llm.generate_stream([STOP_PROMPT, "Once upon a time"], params))
    for outs in by_id.values():
        final = outs[-1].outputs[0]
        text = "".join(o.outputs[0].delta_text for o in outs)
        assert text == final.text
        assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
        shown = ""
        for o in outs[:-1] if include else outs:
            shown += o.outputs[0].delta_text
            assert not any(s in shown for s in stops)
    (stopped,) = [outs for outs in by_id.values() if outs[0].prompt == STOP_PROMPT]
    final = stopped[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == first
    assert final.text == (ref.text[: index + len(first)] if include else ref.text[:index])
    assert_idle(pangu_llm.engine)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=f"'{field}'"):
        SamplingParams(**kwargs)


def test_seventeen_stop_strings_message_gives_the_limit():
    with pytest.raises(InvalidRequestError, match="at most 16 stop strings"):
        SamplingParams(stop=[str(i) for i in range(17)])
    assert len(SamplingParams(stop=[str(i) for i in range(16)]).stop) == 16


def test_prompt_longer_than_context_is_refused(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(InvalidRequestError, match=r"100 tokens but max_model_len is 64"):
        engine.add_request(token_prompt(100), greedy(4))
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request(token_prompt(64), greedy(4))  # no room for a new token
    engine.add_request(token_prompt(63), greedy(4))
    (out,) = drain(engine).values()
    assert len(out.outputs[0].token_ids) == 1


@pytest.mark.parametrize("prompt", [[], ""])
def test_empty_prompt_is_refused(pangu_llm, prompt):
    with pytest.raises(InvalidRequestError, match="empty"):
        pangu_llm.engine.add_request(prompt, greedy(4))
    assert not pangu_llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [2048, -1, 10**9])
def test_token_id_outside_the_vocabulary_is_refused(pangu_llm, bad):
    with pytest.raises(InvalidRequestError, match=rf"token id {bad} is outside the vocabulary \[0, 2048\)"):
        pangu_llm.engine.add_request([5, bad, 7], greedy(4))
    assert not pangu_llm.engine.has_unfinished_requests()


def test_one_bad_prompt_fails_the_whole_generate_call_before_anything_runs(pangu_llm):
    engine = pangu_llm.engine
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        pangu_llm.generate(["Once upon a time", [1, 2, 99999], "The quick brown fox"], greedy(4), False)
    assert not engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="empty"):
        pangu_llm.generate(["a", "b", ""], [greedy(4), greedy(4), greedy(4)], use_tqdm=False)
    assert_idle(engine)


def test_generate_needs_one_sampling_params_per_prompt(pangu_llm):
    with pytest.raises(ValueError, match="2 prompts but 3 sampling params"):
        pangu_llm.generate(["a", "b"], [greedy(1)] * 3, use_tqdm=False)
    assert not pangu_llm.engine.has_unfinished_requests()


def test_request_ids_are_unique(make_engine):
    engine = make_engine()
    engine.add_request("a", greedy(2), request_id="same")
    with pytest.raises(InvalidRequestError, match="'same' is already in use"):
        engine.add_request("b", greedy(2), request_id="same")
    assert len(drain(engine)) == 1


def test_queue_limit_refuses_with_retry_hint(make_engine):
    engine = make_engine(max_queued_requests=2)
    engine.add_request("a", greedy(2))
    engine.add_request("b", greedy(2))
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        engine.add_request("c", greedy(2))
    assert len(drain(engine)) == 2


# ---- warm-up ------------------------------------------------------------------------


def test_warm_up_lengths_spread_the_budget_over_the_batch():
    config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=4096)
    assert warm_up_lengths(config, max_model_len=4096, cache_tokens=10**6) == [128] * 32
    uneven = EngineConfig(max_num_seqs=3, max_num_batched_tokens=100)
    assert warm_up_lengths(uneven, 4096, 10**6) == [34, 33, 33]


def test_warm_up_lengths_leave_room_for_a_token_in_context_and_cache():
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=1024)
    assert warm_up_lengths(config, max_model_len=100, cache_tokens=10**6) == [99, 99]
    assert warm_up_lengths(config, max_model_len=4096, cache_tokens=64) == [63, 63]
    assert warm_up_lengths(config, max_model_len=4096, cache_tokens=1) == []
    few_queued = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_queued_requests=2)
    assert warm_up_lengths(few_queued, 4096, 10**6) == [32, 32]


def test_from_checkpoint_warms_up_with_a_full_step_and_leaves_nothing_behind(pangu_tiny, monkeypatch):
    steps = []
    execute = ModelRunner.execute

    def spy(runner, plan):
        steps.append(plan.num_tokens)
        return execute(runner, plan)

    monkeypatch.setattr(ModelRunner, "execute", spy)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=96)
    engine = LLMEngine.from_checkpoint(pangu_tiny, "float32", config)
    assert steps[0] == 96  # the whole budget in one step, before any request
    assert_idle(engine)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert engine.last_step.seconds == 0
    request = engine.add_request(STOP_PROMPT, greedy(3))
    assert drain(engine)[request].outputs[0].token_ids  # serves as usual afterwards


def test_remote_experts_engine_skips_the_warm_up(pangu_tiny, monkeypatch):
    monkeypatch.setattr(LLMEngine, "warm_up", lambda self: pytest.fail("warm-up without experts"))
    engine = LLMEngine.from_checkpoint(pangu_tiny, "float32", load_experts=False)
    assert_idle(engine)


def test_a_decode_step_reports_the_cached_positions_it_attended_over(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request(list(range(5, 10)), params)
    engine.add_request(list(range(5, 12)), params)
    engine.step()  # both prompts read, a first token each
    assert (engine.last_step.decode_seqs, engine.last_step.decode_context_tokens) == (0, 0)
    engine.step()  # each decodes at the position after its prompt: 5 + 1 and 7 + 1 positions
    assert (engine.last_step.decode_seqs, engine.last_step.decode_context_tokens) == (2, 14)
    engine.step()
    assert engine.last_step.decode_context_tokens == 16
