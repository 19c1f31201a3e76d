"""Disaggregated experts over the ZeroMQ data path: same tokens as colocated, failover, no hangs."""

import time

import pytest
import torch
import zmq

import expertmesh.model.transformer as transformer_module
from expertmesh.config import default_groups
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.llm import LLM
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.experts import ExpertPartition, plan_dispatch
from expertmesh.model.loader import load_config, load_expert_group, load_model
from expertmesh.model.tokenizer_files import load_tokenizer, stop_token_ids
from expertmesh.serve.expert_transport import ExpertGroupServer
from expertmesh.serve.remote_experts import RemoteExpertBackend, joining_balance, pick_replica

PROMPTS = ["def main():", "import os\nimport sys", "class Pool:", "x = [i for i in"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def start_pools(path, groups, replicas):
    return {
        g: [ExpertGroupServer(load_expert_group(path, g, groups)) for _ in range(replicas)]
        for g in range(groups)
    }


def disaggregated_engine(path, groups, servers, timeout_s=5.0, config=None):
    cfg = load_config(path)
    model = load_model(path, load_experts=False)
    backend = RemoteExpertBackend(
        ExpertPartition(cfg.moe.num_experts, groups),
        {g: [s.endpoint for s in pool] for g, pool in servers.items()},
        timeout_s=timeout_s,
    )
    model.set_expert_backend(backend)
    engine = LLMEngine(model, load_tokenizer(path), stop_token_ids(path, cfg.eos_token_ids), config)
    return engine, backend


def run(engine, prompts, params, on_step=None):
    ids = [engine.add_request(p, params) for p in prompts]
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if on_step:
            on_step(steps)
    return [done[i] for i in ids]


def close_all(servers):
    for pool in servers.values():
        for s in pool:
            s.close()


@pytest.mark.parametrize(
    "arch,groups", [("pangu_pro_moe", 4), ("qwen2_moe", 4), ("mixtral", 2), ("deepseek_v3", 4)]
)
def test_disaggregated_greedy_equals_colocated(tiny_checkpoint, arch, groups):
    path = tiny_checkpoint(arch)
    colocated = LLM(path, show_progress=False).generate(PROMPTS, GREEDY, use_tqdm=False)
    servers = start_pools(path, groups, replicas=1)
    try:
        engine, backend = disaggregated_engine(path, groups, servers)
        assert run(engine, PROMPTS, GREEDY) == [o.outputs[0].token_ids for o in colocated]
        assert all(s.requests_served > 0 for pool in servers.values() for s in pool)
        backend.close()
    finally:
        close_all(servers)


def test_deepseek_pools_are_its_routing_groups_and_a_decode_step_reaches_only_the_kept_ones(tiny_checkpoint):
    """noaux_tc keeps topk_group of n_group groups per token: a one-token decode step sends each
    MoE layer's rows to at most topk_group of the n_group pools, never to the others."""
    path = tiny_checkpoint("deepseek_v3")
    moe = load_config(path).moe
    groups = default_groups(moe.num_experts, moe.routing_groups)
    assert groups == moe.num_groups == 4 and moe.topk_group == 2
    servers = start_pools(path, groups, replicas=1)
    try:
        engine, backend = disaggregated_engine(path, groups, servers)
        engine.add_request("def main():", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        engine.step()  # the prompt
        while engine.has_unfinished_requests():
            before = [pool[0].requests_served for pool in servers.values()]
            engine.step()  # one token
            sent = [pool[0].requests_served - b for pool, b in zip(servers.values(), before, strict=True)]
            assert 1 <= sum(sent) <= moe.topk_group * len(load_config(path).moe_layers)
        backend.close()
    finally:
        close_all(servers)


def test_a_replica_killed_mid_run_fails_over_and_output_is_unchanged(tiny_checkpoint):
    path = tiny_checkpoint("pangu_pro_moe")
    colocated = LLM(path, show_progress=False).generate(PROMPTS, GREEDY, use_tqdm=False)
    servers = start_pools(path, 4, replicas=2)
    try:
        engine, backend = disaggregated_engine(path, 4, servers, timeout_s=0.5)
        victims = [pool[0] for pool in servers.values()]

        def kill_after_three_steps(step):
            if step == 3:
                for server in victims:
                    server.close()

        assert run(engine, PROMPTS, GREEDY, kill_after_three_steps) == [
            o.outputs[0].token_ids for o in colocated
        ]
        served_before = [pool[1].requests_served for pool in servers.values()]
        assert all(n > 0 for n in served_before)  # the survivors took over
        assert all(pool[0].requests_served > 0 for pool in servers.values())  # both shared before the kill
        backend.close()
    finally:
        close_all(servers)


def test_pick_replica_least_outstanding_and_skips_down_or_tried():
    assert pick_replica([5, 2, 7], [0, 0, 0], now=10, exclude=set()) == 1
    assert pick_replica([5, 2, 7], [0, 20, 0], now=10, exclude=set()) == 0  # 1 is down until t=20
    assert pick_replica([5, 2, 7], [0, 0, 0], now=10, exclude={1, 0}) == 2
    assert pick_replica([1, 1], [0, 0], now=10, exclude=set()) == 0  # ties: lowest index
    assert pick_replica([1], [20], now=10, exclude=set()) is None
    assert (
        pick_replica([0, 0, 0], [0, 0, 0], now=10, exclude=set(), sent=[90, 30, 60]) == 1
    )  # fewest rows so far


def test_joining_balance_is_level_with_the_least_loaded_replica_that_is_up():
    assert joining_balance([900, 700, 800], [0, 0, 0], now=10) == 700
    assert joining_balance([900, 100, 800], [0, 20, 0], now=10) == 800  # 1 is down: behind, not a peer
    assert joining_balance([900, 100], [20, 20], now=10) == 100  # all down: the least of them
    assert joining_balance([], [], now=10) == 0  # a pool of newcomers only


def test_a_replica_that_joins_a_busy_pool_shares_the_load_from_then_on(tiny_checkpoint):
    # Rows are balanced from the join on: a newcomer is not owed the pool's history (with lifetime
    # counts it would take every request until it had caught up, and the old replica would idle).
    path = tiny_checkpoint("pangu_pro_moe")
    servers = start_pools(path, 4, replicas=2)
    try:
        engine, backend = disaggregated_engine(path, 4, {g: pool[:1] for g, pool in servers.items()})
        run(engine, PROMPTS, GREEDY)  # the first replica of each pool has a history
        before = dict(backend.rows_sent_per_replica)
        scaled = {g: [s.endpoint for s in pool] for g, pool in servers.items()}  # 2 replicas per pool
        backend.update_endpoints(scaled)
        run(engine, PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        for pool in servers.values():
            loads = [backend.rows_sent_per_replica[s.endpoint] - before.get(s.endpoint, 0) for s in pool]
            assert max(loads) / (sum(loads) / len(loads)) <= 1.10, loads
        backend.close()
    finally:
        close_all(servers)


def test_a_dead_pool_fails_only_that_steps_requests_and_the_engine_recovers(tiny_checkpoint):
    path = tiny_checkpoint("pangu_pro_moe")
    colocated = LLM(path, show_progress=False).generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    servers = start_pools(path, 4, replicas=1)
    engine, backend = disaggregated_engine(path, 4, servers, timeout_s=0.3)
    try:
        servers[1][0].close()
        engine.add_request(PROMPTS[0], GREEDY)
        start = time.monotonic()
        outputs = engine.step()  # no hang, no exception: the request fails with a reason
        assert time.monotonic() - start < 5
        assert [o.outputs[0].finish_reason for o in outputs] == ["error"]
        assert "expert group 1" in outputs[0].error
        assert engine.allocator.num_free == engine.allocator.num_blocks
        assert not engine.has_unfinished_requests()

        # Serve would start a new replica; the engine learns its endpoint and goes on
        servers[1] = [ExpertGroupServer(load_expert_group(path, 1, 4))]
        backend.update_endpoints({g: [s.endpoint for s in pool] for g, pool in servers.items()})
        assert run(engine, PROMPTS[:1], GREEDY) == [colocated[0].outputs[0].token_ids]
    finally:
        backend.close()
        close_all(servers)


def test_disaggregated_overlap_greedy_equals_sequential(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("pangu_pro_moe")
    splits = []
    real_split = transformer_module.split_forward_batch
    monkeypatch.setattr(
        transformer_module, "split_forward_batch", lambda b, row: splits.append(row) or real_split(b, row)
    )
    servers = start_pools(path, 4, replicas=2)
    try:
        outputs = {}
        for micro_batches in (1, 2):
            config = EngineConfig(micro_batches=micro_batches, micro_batch_min_tokens=2)
            engine, backend = disaggregated_engine(path, 4, servers, config=config)
            outputs[micro_batches] = run(engine, PROMPTS, GREEDY)
            assert not backend._in_flight
            backend.close()
        assert splits  # all four prompts decode together: every step was cut in two
        assert outputs[2] == outputs[1]
    finally:
        close_all(servers)


def black_hole() -> tuple[zmq.Socket, str]:
    """An endpoint that accepts requests and never answers (a hung replica)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


def random_layer_batch(path, tokens: int, seed: int):
    cfg = load_config(path)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(cfg.moe.num_experts, generator=gen)[:2] for _ in range(tokens)])
    batch, _ = plan_dispatch(hidden, ids, torch.rand(tokens, 2, generator=gen), cfg.moe.num_experts)
    return batch


def test_two_calls_in_flight_on_a_hung_replica_both_fail_over_at_its_first_timeout(tiny_checkpoint):
    path = tiny_checkpoint("pangu_pro_moe")
    cfg = load_config(path)
    colocated = load_model(path).moe_blocks[0].backend
    layer = next(iter(colocated.layers))
    hung, hung_endpoint = black_hole()
    good = {g: ExpertGroupServer(load_expert_group(path, g, 4)) for g in range(4)}
    backend = RemoteExpertBackend(
        ExpertPartition(cfg.moe.num_experts, 4),
        {g: [hung_endpoint, good[g].endpoint] for g in range(4)},
        timeout_s=0.4,
        cooldown_s=0.2,
    )
    try:
        first, second = random_layer_batch(path, 12, seed=1), random_layer_batch(path, 9, seed=2)
        # Keep the good replicas out for a moment so both calls go to the hung one: then one
        # timeout must resend the rows of both, not leave the second call to time out again.
        for pool in backend._pools.values():
            pool[1].down_until = time.monotonic() + 0.2
        a, b = backend.submit(layer, first), backend.submit(layer, second)
        assert torch.allclose(backend.wait(b), colocated.run(layer, second), atol=1e-5)  # out of order
        assert torch.allclose(backend.wait(a), colocated.run(layer, first), atol=1e-5)
        # one timeout per pool resent both calls' rows; a second would have counted a second failure
        assert [pool[0].failures for pool in backend._pools.values()] == [1] * 4
        assert not backend._in_flight
        assert all(s.requests_served == 2 for s in good.values())
    finally:
        backend.close()
        hung.close(linger=0)
        for server in good.values():
            server.close()


def test_calls_in_flight_when_replicas_are_killed_fail_over(tiny_checkpoint):
    path = tiny_checkpoint("pangu_pro_moe")
    cfg = load_config(path)
    colocated = load_model(path).moe_blocks[0].backend
    layer = next(iter(colocated.layers))
    servers = start_pools(path, 4, replicas=2)
    backend = RemoteExpertBackend(
        ExpertPartition(cfg.moe.num_experts, 4),
        {g: [s.endpoint for s in pool] for g, pool in servers.items()},
        timeout_s=0.4,
    )
    try:
        batches = [random_layer_batch(path, 16, seed=s) for s in range(4)]
        calls = [backend.submit(layer, batches[0])]  # may or may not be answered before the kill
        for server in [pool[0] for pool in servers.values()]:
            server.close()
        calls += [backend.submit(layer, b) for b in batches[1:]]  # some of these go to the dead ones
        for call, batch in zip(calls, batches, strict=True):
            assert torch.allclose(backend.wait(call), colocated.run(layer, batch), atol=1e-5)
        assert not backend._in_flight
        assert any(pool[0].failures for pool in backend._pools.values())  # it did fail over
    finally:
        backend.close()
        close_all(servers)
