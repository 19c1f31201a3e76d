"""The Engine -> Router token path: a real engine's outputs through real ZeroMQ sockets on 127.0.0.1.

The Router's view (OutputAssembler) must equal what the engine's own stream yields, token
for token and character for character, for several requests multiplexed on one socket,
and a lost message must not lose the end of a request.
"""

from __future__ import annotations

import asyncio

from test_async_engine import PROMPTS, collect, greedy, run

from expertmesh.engine.async_engine import AsyncLLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.serve.token_stream import Delta, DeltaReceiver, OutputAssembler, StepPublisher


def test_sink_gets_every_output_and_the_stream_only_the_last(make_engine):
    engine = AsyncLLMEngine(make_engine(max_num_seqs=8, max_num_batched_tokens=128))
    try:
        direct = run(collect(engine, PROMPTS[0], greedy(6)))
        sunk = []

        async def with_sink():
            return [out async for out in engine.generate(PROMPTS[0], greedy(6), sink=sunk.append)]

        yielded = run(with_sink())
    finally:
        engine.shutdown()
    assert len(yielded) == 1 and yielded[0].finished
    assert [o.outputs[0].delta_token_ids for o in sunk] == [o.outputs[0].delta_token_ids for o in direct]
    assert yielded[0].outputs[0].token_ids == direct[-1].outputs[0].token_ids


def test_router_reassembles_each_request_from_one_message_per_step(make_engine):
    engine = AsyncLLMEngine(make_engine(max_num_seqs=8, max_num_batched_tokens=128))
    publisher = StepPublisher()
    sent_messages = []
    flush = publisher.flush

    def counting_flush():  # on the engine thread, after each step: one message per Router endpoint
        sent_messages.append(sum(map(len, publisher._pending.values())))
        flush()

    engine._on_step = lambda outputs: counting_flush()
    params = [greedy(5), SamplingParams(temperature=0.8, seed=3, max_tokens=7), greedy(3)]

    async def serve_and_receive():
        receiver = DeltaReceiver("127.0.0.1")
        try:
            references = [await collect(engine, p, sp) for p, sp in zip(PROMPTS, params, strict=False)]

            async def one(index: int) -> tuple[list, object]:
                request_id = f"r{index}"
                queue = receiver.open(request_id)
                sink = lambda out: publisher.add(receiver.endpoint, out)  # noqa: E731
                finals = [o async for o in engine.generate(PROMPTS[index], params[index], request_id, sink)]
                assembler, seen = OutputAssembler(request_id), []
                while not seen or not seen[-1].finished:
                    seen.append(assembler.add(await asyncio.wait_for(queue.get(), 10)))
                receiver.close(request_id)
                return seen, finals[-1]

            results = await asyncio.gather(*(one(i) for i in range(len(params))))
            return references, results
        finally:
            receiver.shutdown()

    try:
        references, results = run(serve_and_receive())
    finally:
        engine.shutdown()
        publisher.close()
    for reference, (seen, final) in zip(references, results, strict=True):
        assert [o.outputs[0].delta_token_ids for o in seen] == [
            o.outputs[0].delta_token_ids for o in reference
        ]
        assert [o.outputs[0].text for o in seen] == [o.outputs[0].text for o in reference]
        assert seen[-1].outputs[0].finish_reason == reference[-1].outputs[0].finish_reason
        assert seen[-1].prompt_token_ids == reference[-1].prompt_token_ids == final.prompt_token_ids
    # the three requests ran together: some steps carried several requests in one message
    assert max(sent_messages) == len(params)


def test_a_lost_message_is_filled_in_from_the_final_output(make_engine):
    engine = AsyncLLMEngine(make_engine(max_num_seqs=8, max_num_batched_tokens=128))
    try:
        outs = run(collect(engine, PROMPTS[1], greedy(6)))
    finally:
        engine.shutdown()
    assembler = OutputAssembler(outs[0].request_id)
    got = [assembler.add(Delta.of(outs[0])), assembler.add(Delta.of(outs[1]))]  # then 2..5 never arrive
    got.append(assembler.finish(outs[-1]))
    final = outs[-1].outputs[0]
    assert got[-1].finished and got[-1].outputs[0].token_ids == final.token_ids
    assert got[-1].outputs[0].text == final.text
    assert sum((o.outputs[0].delta_token_ids for o in got), []) == final.token_ids
    assert "".join(o.outputs[0].delta_text for o in got) == final.text
