"""AsyncLLMEngine: streams per request from the engine thread; leaving a stream aborts its request.

Each test runs its own event loop with asyncio.run, guarded by a timeout so a hang fails fast.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from expertmesh.engine.async_engine import AsyncLLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.errors import InvalidRequestError

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "1, 2, 3, 4,"]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


@pytest.fixture
def aengine(make_engine):
    engine = AsyncLLMEngine(make_engine(max_num_seqs=8, max_num_batched_tokens=128))
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()


def idle(aengine: AsyncLLMEngine) -> bool:
    e = aengine.engine
    return not e.has_unfinished_requests() and e.allocator.num_free == e.allocator.num_blocks


async def collect(aengine, prompt, params, request_id=None):
    return [out async for out in aengine.generate(prompt, params, request_id)]


def test_stream_arrives_token_by_token_and_ends_finished(aengine, greedy_reference):
    outs = run(collect(aengine, PROMPTS[0], greedy(8)))
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 9))
    assert [o.finished for o in outs] == [False] * 7 + [True]
    assert outs[-1].outputs[0].finish_reason == "length"
    text = "".join(o.outputs[0].delta_text for o in outs)
    ids = [t for o in outs for t in o.outputs[0].delta_token_ids]
    ref = greedy_reference(PROMPTS[0], 8)
    assert (
        (text, ids) == (ref.text, ref.token_ids) == (outs[-1].outputs[0].text, outs[-1].outputs[0].token_ids)
    )
    assert idle(aengine)


def test_concurrent_requests_match_offline_greedy(aengine, greedy_reference):
    lengths = [10, 4, 7, 12]

    async def main():
        return await asyncio.gather(
            *(collect(aengine, p, greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True))
        )

    results = run(main())
    for prompt, n, outs in zip(PROMPTS, lengths, results, strict=True):
        assert outs[-1].finished and len(outs) == n
        ref = greedy_reference(prompt, n)
        assert outs[-1].outputs[0].text == ref.text
        assert outs[-1].outputs[0].token_ids == ref.token_ids
    assert idle(aengine)


def test_breaking_out_of_the_stream_aborts_the_request(aengine, greedy_reference):
    engine = aengine.engine

    async def main():
        other = asyncio.ensure_future(collect(aengine, PROMPTS[1], greedy(30)))
        got = 0
        async for out in aengine.generate(PROMPTS[0], greedy(1000), request_id="leaver"):
            assert not out.finished
            got += 1
            if got == 1:
                leaver = next(s for s in engine.scheduler.running if s.request_id == "leaver")
            if got == 3:
                break
        assert await eventually(lambda: leaver.finished)
        assert leaver.finish_reason == "abort"
        assert leaver.blocks == []
        assert "leaver" not in [s.request_id for s in engine.scheduler.running]
        return leaver, await other

    leaver, other = run(main())
    assert len(leaver.output_token_ids) < 1000
    assert other[-1].outputs[0].token_ids == greedy_reference(PROMPTS[1], 30).token_ids
    assert idle(aengine)


def test_closing_the_stream_frees_its_blocks_at_once(aengine):
    engine = aengine.engine

    async def main():
        stream = aengine.generate(PROMPTS[0], greedy(1000))
        first = await stream.__anext__()
        assert not first.finished
        assert engine.allocator.num_free < engine.allocator.num_blocks
        await stream.aclose()
        assert not engine.has_unfinished_requests()
        assert engine.allocator.num_free == engine.allocator.num_blocks

    run(main())


def test_cancelling_the_consumer_task_aborts_the_request(aengine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in aengine.generate(PROMPTS[2], greedy(1000)):
                started.set()

        task = asyncio.ensure_future(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await eventually(lambda: idle(aengine))

    run(main())


def test_abort_by_id_ends_the_stream(aengine):
    """abort() must end the caller's stream too, not leave it waiting for output that never comes."""

    async def main():
        outs = []

        async def consume():
            async for out in aengine.generate(PROMPTS[0], greedy(1000), request_id="doomed"):
                outs.append(out)
                if len(outs) == 2:
                    assert aengine.abort("doomed") is True

        await asyncio.wait_for(consume(), 3.0)
        assert len(outs) < 1000
        assert not outs[-1].finished  # the stream ended at the abort, with no finished output
        assert idle(aengine)

    run(main())


def test_bad_request_raises_from_the_stream_and_leaves_nothing_behind(aengine):
    async def main():
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await collect(aengine, [1, 2, 10**6], greedy(4))
        with pytest.raises(InvalidRequestError, match="'top_p'"):
            await collect(aengine, PROMPTS[0], SamplingParams(top_p=2.0))
        # The engine still serves.
        outs = await collect(aengine, PROMPTS[0], greedy(3))
        assert outs[-1].finished

    run(main())
    assert idle(aengine)
    assert aengine._streams == {}


def test_duplicate_request_id_is_refused_without_breaking_the_first_stream(aengine, greedy_reference):
    async def main():
        first = aengine.generate(PROMPTS[0], greedy(20), request_id="dup")
        outs = [await first.__anext__()]
        with pytest.raises(InvalidRequestError, match="already in use"):
            await collect(aengine, PROMPTS[1], greedy(4), request_id="dup")
        # The first request keeps streaming to its own caller.
        outs += await asyncio.wait_for(_rest(first), 3.0)
        return outs

    outs = run(main())
    assert outs[-1].finished
    assert outs[-1].outputs[0].token_ids == greedy_reference(PROMPTS[0], 20).token_ids
    assert idle(aengine)


async def _rest(stream):
    return [out async for out in stream]


def test_shutdown_stops_the_engine_thread(make_engine):
    aengine = AsyncLLMEngine(make_engine(max_num_seqs=2, max_num_batched_tokens=32))
    outs = run(collect(aengine, PROMPTS[3], greedy(2)))
    assert outs[-1].finished
    aengine.shutdown()
    assert not aengine._thread.is_alive()


def test_shutdown_ends_open_streams_and_refuses_new_requests(make_engine):
    """After shutdown nothing will step the engine: callers must get an error, not wait forever."""
    aengine = AsyncLLMEngine(make_engine(max_num_seqs=2, max_num_batched_tokens=32))

    async def main():
        stream = aengine.generate(PROMPTS[0], greedy(1000))
        await stream.__anext__()
        aengine.shutdown()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(_rest(stream), 3.0)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(collect(aengine, PROMPTS[1], greedy(2)), 3.0)

    run(main())
    assert not aengine._thread.is_alive()
    assert not aengine.engine.has_unfinished_requests()


def test_an_engine_built_from_a_factory_is_built_on_the_engine_thread_and_serves(
    make_engine, greedy_reference
):
    # Built there, the engine thread is the only one that ever ran torch's parallel work.
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return make_engine(max_num_seqs=8, max_num_batched_tokens=128)

    aengine = AsyncLLMEngine(build)
    try:
        assert built_on == ["expertmesh-engine"]
        assert aengine._thread.name == "expertmesh-engine"

        final = run(collect(aengine, PROMPTS[0], greedy(6)))[-1]
        assert final.finished and final.outputs[0].token_ids == greedy_reference(PROMPTS[0], 6).token_ids
    finally:
        aengine.shutdown()


def test_a_factory_that_fails_fails_the_constructor_and_leaves_no_thread():
    def build():
        raise FileNotFoundError("no checkpoint at /nowhere")

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        AsyncLLMEngine(build)
    assert eventually_sync(lambda: {t.name for t in threading.enumerate()} <= before)


def test_stream_false_through_the_local_client_yields_only_the_finished_output(make_engine, greedy_reference):
    from expertmesh.api.engine_client import LocalEngineClient

    client = LocalEngineClient().add("m", AsyncLLMEngine(make_engine()))
    try:

        async def main(stream):
            return [out async for out in client.generate("m", PROMPTS[1], greedy(5), f"r-{stream}", stream)]

        whole, streamed = run(main(False)), run(main(True))
        assert len(whole) == 1 and whole[0].finished
        assert len(streamed) > 1 and streamed[-1].outputs[0].token_ids == whole[0].outputs[0].token_ids
        assert whole[0].outputs[0].token_ids == greedy_reference(PROMPTS[1], 5).token_ids
    finally:
        client.shutdown()


def eventually_sync(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
