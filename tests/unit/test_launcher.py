"""`expertmesh serve` shares the machine's cores among the engines that do not choose their own."""

from __future__ import annotations

from expertmesh.config import ServeConfig
from expertmesh.serve.launcher import computing_replicas, share_cores


def config(*revisions: dict) -> ServeConfig:
    return ServeConfig.parse(
        {
            "models": [
                {"name": f"m{i}", "revisions": [{"source": "/ckpt"} | r]} for i, r in enumerate(revisions)
            ]
        }
    )


def engine_threads(cfg: ServeConfig) -> list[int]:
    return [r.engine_threads for m in cfg.models for r in m.revisions]


def eight_groups(_rev) -> int:
    return 8


def test_one_colocated_engine_takes_every_core():
    assert engine_threads(share_cores(config({}), 2, eight_groups)) == [2]
    assert engine_threads(share_cores(config({}), 16, eight_groups)) == [16]


def test_engines_and_expert_replicas_share_the_cores():
    disaggregated = {"expert_parallel": {"enabled": True, "replicas_per_group": 2}}
    assert computing_replicas(config(disaggregated), eight_groups) == 1 + 16
    # 2 cores, one engine and 16 expert replicas: the engine keeps one thread
    assert engine_threads(share_cores(config(disaggregated), 2, eight_groups)) == [1]
    assert engine_threads(share_cores(config(disaggregated), 68, eight_groups)) == [4]
    # three colocated engines (one with two replicas) on 16 cores
    two = {"engine_replicas": 2}
    assert engine_threads(share_cores(config({}, two, {}), 16, eight_groups)) == [4, 4, 4]


def test_an_engine_that_chose_its_threads_or_cpus_keeps_them_and_counts():
    chosen = {"engine_threads": 6}
    reserved = {"resources": {"engine": {"num_cpus": 3}}}
    shared = share_cores(config(chosen, reserved, {}), 16, eight_groups)
    assert engine_threads(shared) == [6, 1, 2]  # 16 cores // (6 + 1 + 1) threads
    assert engine_threads(share_cores(config({"engine_threads": 1}), 2, eight_groups)) == [1]


def test_never_more_threads_than_a_revision_may_have():
    assert engine_threads(share_cores(config({}), 1024, eight_groups)) == [256]
    assert engine_threads(share_cores(config({}), 1, eight_groups)) == [1]


def test_everything_else_is_kept():
    cfg = ServeConfig.parse(
        {
            "models": [
                {"name": "m", "revisions": [{"source": "/ckpt", "name": "v2"}], "traffic": {"v2": 100}}
            ],
            "api_key": "secret-key",
            "http_port": 8123,
        }
    )
    shared = share_cores(cfg, 4, eight_groups)
    assert shared.model_dump(exclude={"models"}) == cfg.model_dump(exclude={"models"})
    assert shared.models[0].model_dump(exclude={"revisions"}) == cfg.models[0].model_dump(
        exclude={"revisions"}
    )
    assert shared.models[0].revisions[0].model_dump(exclude={"engine_threads"}) == cfg.models[0].revisions[
        0
    ].model_dump(exclude={"engine_threads"})
