"""The pure side of expertmesh metrics: imbalance, windows, the samples a flush records.

The Ray and Prometheus side is in tests/integration/test_metrics_prometheus.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from expertmesh.engine.async_engine import AsyncLLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.sequence import CompletionOutput, RequestOutput
from expertmesh.errors import InvalidRequestError
from expertmesh.kernels.guard import NATIVE, TORCH, Choice
from expertmesh.model.experts import ExpertPartition
from expertmesh.serve.metrics import (
    BATCH_SIZE,
    EXPERT_TOKENS,
    GENERATION_TOKENS,
    GROUP_IMBALANCE,
    GROUP_TOKENS,
    KERNEL_PATH,
    KV_CACHE_USAGE,
    PROMPT_TOKENS,
    QUEUE_DEPTH,
    REPLICA_IMBALANCE,
    REPLICA_ROWS,
    REQUESTS,
    SERIES,
    TPOT,
    TTFT,
    EngineState,
    FinishedRequest,
    Sample,
    StepWindow,
    counter_deltas,
    expert_rows,
    group_loads,
    imbalance,
    kernel_path_samples,
    outcome_of,
    request_timings,
    stored_series_names,
    track_request,
    window_samples,
)


def output(n_tokens: int, finished: bool, reason: str | None = None, t0: float = 100.0) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        prompt="p",
        prompt_token_ids=[1, 2],
        outputs=[CompletionOutput(0, "", list(range(n_tokens)), reason, None)],
        finished=finished,
        arrival_time=t0,
        first_token_time=t0 + 0.5 if n_tokens else None,
        finished_time=t0 + 0.5 + 0.1 * (n_tokens - 1) if finished else None,
    )


def test_imbalance_is_max_over_mean():
    assert imbalance([5, 5, 5, 5]) == 1.0
    assert imbalance([3, 1]) == 1.5
    assert imbalance([8, 0, 0, 0]) == 4.0  # all on one of four: the worst, len(loads)
    assert imbalance([]) is None
    assert imbalance([0, 0]) is None  # nothing sent: no ratio, not "balanced"


def test_group_loads_sum_contiguous_experts():
    partition = ExpertPartition(num_experts=8, num_groups=4)
    assert group_loads([1, 2, 3, 4, 5, 6, 7, 8], partition) == [3, 7, 11, 15]


def test_counter_deltas_count_new_keys_from_zero():
    assert counter_deltas({"a": 10, "b": 4}, {"a": 7}) == {"a": 3, "b": 4}


def test_request_timings():
    ttft, tpot = request_timings(output(5, finished=True, reason="length"))
    assert ttft == pytest.approx(0.5)
    assert tpot == pytest.approx(0.1)  # 4 gaps of 0.1 s after the first token
    assert request_timings(output(1, finished=True, reason="stop")) == (pytest.approx(0.5), None)
    assert request_timings(output(0, finished=False)) == (None, None)
    assert request_timings(output(3, finished=False))[1] is None  # still running: no TPOT yet


def test_outcome_of_a_stream_that_ended():
    assert outcome_of(output(3, True, "length")) == "length"
    assert outcome_of(output(3, True, "stop")) == "stop"
    assert outcome_of(output(3, True, "error")) == "error"
    assert outcome_of(output(3, False)) == "abort"  # ended before a finished output
    assert outcome_of(None) == "abort"


def test_stored_names_follow_prometheus_conventions():
    names = stored_series_names()
    assert "expertmesh_requests_total" in names
    assert {f"expertmesh_time_to_first_token_seconds_{s}" for s in ("bucket", "sum", "count")} <= names
    assert "expertmesh_kv_cache_usage_ratio" in names
    assert all(n.startswith("expertmesh_") for n in names)
    assert len({s.name for s in SERIES}) == len(SERIES)
    for s in SERIES:  # the labels every series gets from the sink must not be redeclared
        assert not {"model", "revision", "pool"} & set(s.labels)


def test_window_samples_for_a_moge_window():
    partition = ExpertPartition(num_experts=8, num_groups=4)
    window = StepWindow()
    # MoGE: each token takes one expert of every group, so each group gets every token once.
    window.add_step(6, 2, [(0, [1, 1, 2, 0, 0, 2, 1, 1]), (1, [2, 0, 0, 2, 1, 1, 2, 0])])
    window.add_step(0, 2, [(0, [1, 1, 0, 2, 2, 0, 1, 1]), (1, [0, 2, 2, 0, 1, 1, 0, 2])])
    finished = [
        FinishedRequest("length", 0.2, 0.01),
        FinishedRequest("abort", 0.3),
        FinishedRequest("length"),
    ]
    samples = window_samples(window, finished, EngineState(2, 1, 0.25), partition)

    def pick(series):
        return {(s.pool, s.labels): s.value for s in samples if s.series is series}

    assert pick(BATCH_SIZE) == {("engine", ()): 2}
    assert pick(QUEUE_DEPTH) == {("engine", ()): 1}
    assert pick(KV_CACHE_USAGE) == {("engine", ()): 0.25}
    assert pick(PROMPT_TOKENS) == {("engine", ()): 6}
    assert pick(GENERATION_TOKENS) == {("engine", ()): 4}
    assert pick(REQUESTS) == {
        ("engine", (("outcome", "abort"),)): 1,
        ("engine", (("outcome", "length"),)): 2,
    }
    assert sorted(s.value for s in samples if s.series is TTFT) == [0.2, 0.3]
    assert [s.value for s in samples if s.series is TPOT] == [0.01]
    groups = pick(GROUP_TOKENS)
    assert set(groups.values()) == {4}  # 4 tokens in 2 steps, every group, every layer
    assert sorted(groups) == sorted(
        (f"experts-g{g}", (("layer", str(layer)),)) for g in range(4) for layer in (0, 1)
    )
    assert pick(GROUP_IMBALANCE) == {("engine", (("layer", "0"),)): 1.0, ("engine", (("layer", "1"),)): 1.0}
    experts = pick(EXPERT_TOKENS)
    assert experts[("experts-g0", (("expert", "0"),))] == 1 + 2 + 1 + 0
    assert experts[("experts-g3", (("expert", "7"),))] == 1 + 0 + 1 + 2
    assert sum(experts.values()) == 4 * 4 * 2  # tokens x groups x layers
    assert all(v > 0 for v in experts.values())  # Ray counters refuse 0; omitted instead


def test_window_samples_topk_imbalance_and_replicas():
    partition = ExpertPartition(num_experts=4, num_groups=2)
    window = StepWindow()
    window.add_step(0, 1, [(3, [3, 0, 1, 0])])  # group 0 got 3 rows, group 1 one
    rows = {"tcp://a:1": 30, "tcp://a:2": 10, "tcp://b:1": 0}
    pools = {0: ["tcp://a:1", "tcp://a:2"], 1: ["tcp://b:1"]}
    samples = window_samples(window, [], EngineState(1, 0, 0.1), partition, rows, pools)
    assert [(s.labels, s.value) for s in samples if s.series is GROUP_IMBALANCE] == [((("layer", "3"),), 1.5)]
    assert {(s.pool, s.value) for s in samples if s.series is REPLICA_IMBALANCE} == {("experts-g0", 1.5)}
    assert {s.labels: s.value for s in samples if s.series is REPLICA_ROWS} == {
        (("endpoint", "tcp://a:1"),): 30,
        (("endpoint", "tcp://a:2"),): 10,
    }


def test_an_idle_window_sets_only_gauges():
    samples = window_samples(StepWindow(), [], EngineState(0, 0, 0.0), ExpertPartition(8, 4))
    assert {s.series for s in samples} == {BATCH_SIZE, QUEUE_DEPTH, KV_CACHE_USAGE}


def test_moge_engine_window_is_balanced_and_counts_every_token(make_engine, pangu_tiny):
    """A real pangu engine: per layer, every MoGE group gets exactly the tokens the step fed."""
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=64)
    moe = engine.model.config.moe
    partition = ExpertPartition(moe.num_experts, moe.num_routing_groups)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=5)
    prompts = ["def main():", "import os", "class Pool:"]
    for prompt in prompts:
        engine.add_request(prompt, params)
    window, states, prompt_tokens = StepWindow(), [], 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        window.add_step(engine.last_step.prefill_tokens, len(outs), expert_rows(engine.model))
        states.append(EngineState.of(engine))
    prompt_tokens = sum(len(engine.tokenize(p)[1]) for p in prompts)
    assert window.prompt_tokens == prompt_tokens
    assert window.generation_tokens == 5 * len(prompts)
    fed = prompt_tokens + (5 - 1) * len(prompts)  # the last sampled token is never fed back
    assert sorted(window.layer_expert_rows) == [b.layer for b in engine.model.moe_blocks]
    for rows in window.layer_expert_rows.values():
        assert group_loads(rows, partition) == [fed] * partition.num_groups
    assert states[0].running == len(prompts) and states[0].kv_cache_usage > 0
    # all finished, the cache given back (blocks the prefix cache keeps idle count as free)
    queried = {"enabled": True, "queries": prompt_tokens, "hits": 0, "cached_blocks": 0}
    assert EngineState.of(engine) == EngineState(0, 0, 0.0, queried, None)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def aengine(make_engine):
    steps = []
    engine = AsyncLLMEngine(make_engine(max_num_seqs=4, max_num_batched_tokens=64), on_step=steps.append)
    engine.steps = steps
    yield engine
    engine.shutdown()


def test_on_step_sees_every_steps_outputs(aengine):
    async def go():
        return [o async for o in aengine.generate("def main():", SamplingParams(temperature=0, max_tokens=4))]

    outs = run(go())
    # on_step runs just after the step's outputs are handed out: the stream may end first
    deadline = time.monotonic() + 10
    while sum(len(step) for step in aengine.steps) < len(outs) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sum(len(step) for step in aengine.steps) == len(outs)


def test_a_failing_on_step_does_not_stop_the_engine(make_engine):
    def broken(outputs):
        raise RuntimeError("observer bug")

    engine = AsyncLLMEngine(make_engine(), on_step=broken)
    try:

        async def go():
            params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=3)
            return [o async for o in engine.generate("x", params)]

        assert run(go())[-1].finished
    finally:
        engine.shutdown()


def test_track_request_records_how_each_stream_ended(aengine):
    ended: list[tuple[RequestOutput | None, str]] = []

    def record(last, outcome):
        ended.append((last, outcome))

    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)

    async def full():
        return [o async for o in track_request(aengine.generate("def main():", params), record)]

    async def early():
        stream = track_request(aengine.generate("import os", params), record)
        async for _ in stream:
            break  # the client leaves after the first token
        await stream.aclose()

    async def invalid():
        with pytest.raises(InvalidRequestError):
            async for _ in track_request(aengine.generate("x" * 100_000, params), record):
                pass

    outs = run(full())
    assert ended[-1][1] == "length" and ended[-1][0] is outs[-1]
    run(early())
    assert ended[-1][1] == "abort" and ended[-1][0].num_output_tokens == 1
    run(invalid())
    assert ended[-1] == (None, "rejected")
    engine = aengine.engine
    assert not engine.has_unfinished_requests()  # the early stop aborted its request at once
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_each_guarded_op_and_size_reports_the_path_its_guard_chose():
    choices = {"linear": Choice(64, NATIVE, TORCH), "experts": Choice(256, NATIVE, NATIVE)}
    assert kernel_path_samples(choices, "experts-g0") == [
        Sample(KERNEL_PATH, 1, "experts-g0", (("op", "experts"), ("size", "decode"), ("path", "native"))),
        Sample(KERNEL_PATH, 1, "experts-g0", (("op", "experts"), ("size", "prefill"), ("path", "native"))),
        Sample(KERNEL_PATH, 1, "experts-g0", (("op", "linear"), ("size", "decode"), ("path", "native"))),
        Sample(KERNEL_PATH, 1, "experts-g0", (("op", "linear"), ("size", "prefill"), ("path", "torch"))),
    ]
    assert kernel_path_samples({}) == []


def test_prefix_cache_samples_are_what_the_cache_gained_and_holds():
    stats = {"enabled": True, "queries": 96, "hits": 64, "cached_blocks": 7}
    samples = window_samples(
        StepWindow(), [], EngineState(0, 0, 0.0, stats), None, engine_gained={"queries": 32, "hits": 0}
    )
    got = {s.series.name: s.value for s in samples if s.series.name.startswith("expertmesh_prefix")}
    # a counter that gained nothing records nothing (Ray's counters refuse 0)
    assert got == {"expertmesh_prefix_cache_blocks": 7, "expertmesh_prefix_cache_queries": 32}
    off = window_samples(StepWindow(), [], EngineState(0, 0, 0.0), None)
    assert not [s for s in off if s.series.name.startswith("expertmesh_prefix")]


def test_speculation_samples_are_what_it_proposed_and_kept():
    gained = {"queries": 0, "hits": 0, "proposed": 40, "accepted": 31}
    samples = window_samples(StepWindow(), [], EngineState(0, 0, 0.0), None, engine_gained=gained)
    got = {s.series.name: s.value for s in samples if s.series.name.startswith("expertmesh_spec")}
    assert got == {"expertmesh_spec_decode_proposed_tokens": 40, "expertmesh_spec_decode_accepted_tokens": 31}
