"""Disaggregated experts over the ZeroMQ data path: same tokens as colocated, failover, no hangs."""

import time

import pytest

from expertmesh.engine.llm import LLM
from expertmesh.engine.llm_engine import LLMEngine, load_tokenizer, stop_token_ids
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.experts import ExpertPartition
from expertmesh.model.loader import load_config, load_expert_group, load_model
from expertmesh.serve.expert_transport import ExpertGroupServer
from expertmesh.serve.remote_experts import RemoteExpertBackend, pick_replica

PROMPTS = ["def main():", "import os\nimport sys", "class Pool:", "x = [i for i in"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def start_pools(path, groups, replicas):
    return {
        g: [ExpertGroupServer(load_expert_group(path, g, groups)) for _ in range(replicas)]
        for g in range(groups)
    }


def disaggregated_engine(path, groups, servers, timeout_s=5.0):
    cfg = load_config(path)
    model = load_model(path, load_experts=False)
    backend = RemoteExpertBackend(
        ExpertPartition(cfg.moe.num_experts, groups),
        {g: [s.endpoint for s in pool] for g, pool in servers.items()},
        timeout_s=timeout_s,
    )
    model.set_expert_backend(backend)
    return LLMEngine(model, load_tokenizer(path), stop_token_ids(path, cfg.eos_token_ids)), backend


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


@pytest.mark.parametrize("arch,groups", [("pangu_pro_moe", 4), ("qwen2_moe", 4), ("mixtral", 2)])
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
