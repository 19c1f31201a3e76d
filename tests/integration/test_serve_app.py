"""The Serve application on a real in-process Ray: colocated and disaggregated give the same tokens."""

import collections
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from polling import wait_until
from ray import serve

from expertmesh.config import ServeConfig, traffic_table
from expertmesh.engine.llm import LLM
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.serve.app import deploy
from expertmesh.serve_layout import APP_NAME

PROMPTS = ["def main():", "import os\nimport sys", "class Pool:"]
GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_serve(free_port):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


EXAMPLES = Path(__file__).resolve().parents[2] / "deployments" / "serve"


def example_model(
    file: str,
    name: str,
    source: Path,
    replicas_per_group: int | None = None,
    resources: dict | None = None,
    **engine,
) -> dict:
    """A model of an example config (deployments/serve/), pointed at the tiny checkpoint."""
    (model,) = ServeConfig.from_yaml(EXAMPLES / file).model_dump(mode="json")["models"]
    model["name"] = name
    for revision in model["revisions"]:
        revision["source"] = str(source)
        revision["engine"].update(engine)
        if replicas_per_group:
            revision["expert_parallel"]["replicas_per_group"] = replicas_per_group
        if resources:
            revision["resources"] = resources
    return model


# What two of the app's revisions reserve in Ray for each replica: small enough to fit 2 CPUs.
ENGINE_RESERVATION = {"num_cpus": 0.25, "memory_bytes": 1 << 20}
EXPERT_RESERVATION = {"num_cpus": 0.01}


@pytest.fixture(scope="module")
def app(ray_serve, pangu_tiny):
    config = ServeConfig.parse(
        {
            "models": [
                example_model("colocated.yaml", "colocated", pangu_tiny),
                # with the ping-pong overlap on for every step of two or more tokens, so the
                # tests below (tokens, failover under load) run it through real pools
                example_model(
                    "disaggregated.yaml",
                    "disaggregated",
                    pangu_tiny,
                    replicas_per_group=2,
                    resources={"experts": EXPERT_RESERVATION},
                    micro_batches=2,
                    micro_batch_min_tokens=2,
                ),
                {
                    "name": "one-seat",  # one running request, one waiting: the third is refused
                    "revisions": [
                        {
                            "source": str(pangu_tiny),
                            "engine": {
                                "max_num_seqs": 1,
                                "max_num_batched_tokens": 16,
                                "max_queued_requests": 1,
                            },
                            "resources": {"engine": ENGINE_RESERVATION},
                        }
                    ],
                },
                {
                    "name": "prefix-routed",  # two engine replicas behind the prefix-aware router
                    "revisions": [{"source": str(pangu_tiny), "engine_replicas": 2}],
                },
                {
                    "name": "two-revisions",
                    "revisions": [
                        {"name": "v1", "source": str(pangu_tiny)},
                        {"name": "v2", "source": str(pangu_tiny)},
                    ],
                    "traffic": {"v1": 100, "v2": 0},
                },
            ]
        }
    )
    deploy(config)  # declaratively, as a RayService's serveConfigV2 is applied
    return config, serve.get_app_handle(APP_NAME), ray_serve


def generate(handle, model, prompt):
    stream = handle.options(stream=True, method_name="generate").remote(model, prompt, GREEDY)
    outs = list(stream)
    assert outs[-1].finished
    return outs[-1].outputs[0].token_ids


def test_colocated_and_disaggregated_give_the_offline_engines_tokens(app, pangu_tiny):
    _, handle, _ = app
    offline = LLM(pangu_tiny, show_progress=False).generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    for prompt, want in zip(PROMPTS, offline, strict=True):
        assert generate(handle, "colocated", prompt) == want.outputs[0].token_ids
        assert generate(handle, "disaggregated", prompt) == want.outputs[0].token_ids


def test_overlapped_disaggregated_batch_gives_the_tokens_of_one_batch_colocated(app, pangu_tiny):
    # concurrent requests share steps, which the disaggregated engine cuts into two micro-batches
    _, handle, _ = app
    params = dict(GREEDY, max_tokens=16)
    offline = LLM(pangu_tiny, show_progress=False).generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    want = [o.outputs[0].token_ids for o in offline]
    before = handle.engine_info.remote("disaggregated", "v1").result()["micro_batched_steps"]
    for model in ("colocated", "disaggregated"):
        streams = [
            handle.options(stream=True, method_name="generate").remote(model, p, params) for p in PROMPTS
        ]
        assert [list(s)[-1].outputs[0].token_ids for s in streams] == want, model
    assert handle.engine_info.remote("disaggregated", "v1").result()["micro_batched_steps"] > before
    assert (
        handle.engine_info.remote("colocated", "v1").result()["micro_batched_steps"] == 0
    )  # nothing to overlap


def test_each_expert_pool_is_its_own_deployment(app):
    status = serve.status().applications["disaggregated-v1"].deployments  # the revision's application
    pools = sorted(name for name in status if name.startswith("experts-disaggregated"))
    assert pools == [f"experts-disaggregated-v1-g{g}" for g in range(4)]  # tiny pangu: 4 MoGE groups
    assert all(status[name].status == "HEALTHY" for name in status)


def test_a_revisions_resources_are_what_ray_reserves_for_each_replica(app):
    # one-seat's engine and the disaggregated model's 8 expert replicas (4 groups x 2) reserve;
    # every other replica of the platform reserves nothing
    cluster, available = ray.cluster_resources(), ray.available_resources()
    reserved_cpus = ENGINE_RESERVATION["num_cpus"] + 8 * EXPERT_RESERVATION["num_cpus"]
    assert cluster["CPU"] - available["CPU"] == pytest.approx(reserved_cpus, abs=1e-3)
    assert cluster["memory"] - available["memory"] == pytest.approx(ENGINE_RESERVATION["memory_bytes"])


def test_traffic_shift_is_a_reconfigure_not_a_restart(app):
    config, handle, _ = app
    before = {rev: handle.engine_info.remote("two-revisions", rev).result()["pid"] for rev in ("v1", "v2")}
    assert {handle.revision_for.remote("two-revisions", d / 10).result() for d in range(10)} == {"v1"}
    shifted = config.model_copy(deep=True)
    (two,) = [m for m in shifted.models if m.name == "two-revisions"]
    two.traffic = {"v1": 0, "v2": 100}
    deploy(shifted)
    assert traffic_table(shifted)["two-revisions"] == {"v1": 0, "v2": 100}
    assert {handle.revision_for.remote("two-revisions", d / 10).result() for d in range(10)} == {"v2"}
    after = {rev: handle.engine_info.remote("two-revisions", rev).result()["pid"] for rev in ("v1", "v2")}
    assert after == before  # the engines' processes were not restarted


def test_a_weighted_split_sends_each_revision_its_share(app):
    """90/10: the Router's own random draw (the one `generate` routes by), over many requests,
    gives v2 its share within 4.5 binomial standard deviations (false alarm about 1 in 10^5)."""
    config, handle, _ = app
    split = config.model_copy(deep=True)
    (two,) = [m for m in split.models if m.name == "two-revisions"]
    two.traffic = {"v1": 90, "v2": 10}
    deploy(split)
    n, share = 2000, 0.10
    calls = [handle.revision_for.remote("two-revisions") for _ in range(n)]
    chosen = collections.Counter(call.result() for call in calls)
    assert set(chosen) == {"v1", "v2"}
    bound = 4.5 * math.sqrt(n * share * (1 - share))
    assert abs(chosen["v2"] - n * share) <= bound, chosen


def test_requests_sharing_a_prefix_go_to_the_replica_that_caches_it(app, pangu_tiny):
    """Two system prompts, interleaved, over two engine replicas: after each prompt's first
    request, every later one lands where its prefix is cached (random routing would make all
    four later requests hit with probability 1/16), and gets the offline engine's tokens."""
    _, handle, _ = app
    systems = [f"You are assistant {name}. Answer briefly and only in code.\n" * 4 for name in "AB"]
    questions = ["def main():", "import os", "class Pool:"]
    prompts = [system + q for q in questions for system in systems]  # A1 B1 A2 B2 A3 B3
    finals = []
    for prompt in prompts:
        stream = handle.options(stream=True, method_name="generate").remote("prefix-routed", prompt, GREEDY)
        finals.append(list(stream)[-1])
    offline = LLM(pangu_tiny, show_progress=False).generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    assert [f.outputs[0].token_ids for f in finals] == [o.outputs[0].token_ids for o in offline]
    assert [f.num_cached_tokens > 0 for f in finals] == [False, False, True, True, True, True]


def test_unknown_model_is_named(app):
    _, handle, _ = app
    with pytest.raises(Exception, match="model 'nope' is not served here; available models: 'colocated'"):
        handle.revision_for.remote("nope").result()


def test_openai_client_through_the_serve_http_proxy(app, pangu_tiny):
    openai = pytest.importorskip("openai")
    _, _, url = app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == [
        "colocated",
        "disaggregated",
        "one-seat",
        "prefix-routed",
        "two-revisions",
    ]
    offline = LLM(pangu_tiny, show_progress=False).generate(
        PROMPTS[:1], SamplingParams(**GREEDY), use_tqdm=False
    )
    for model in ("colocated", "disaggregated"):
        reply = client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].text == offline[0].outputs[0].text
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(
                model=model,
                prompt=PROMPTS[0],
                max_tokens=10,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            if chunk.choices
        )
        assert streamed == offline[0].outputs[0].text
    with pytest.raises(openai.NotFoundError, match="'nope' is not served"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_a_full_queue_is_refused_at_once_and_a_client_that_leaves_frees_its_seat(app):
    openai = pytest.importorskip("openai")
    _, handle, url = app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    long = dict(max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})

    def occupancy():
        return handle.engine_info.remote("one-seat", "v1").result()["requests"]

    free_at_rest = occupancy()["free_blocks"]
    # fill the seat and the one queue place with streams that stay open
    running = client.completions.create(model="one-seat", prompt="def a():", stream=True, **long)
    next(iter(running))
    queued = handle.options(stream=True, method_name="generate").remote(
        "one-seat", "def b():", {"max_tokens": 4}
    )
    wait_until(lambda: occupancy()["waiting"] == 1, "the second request waiting in the engine")
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError, match="max_queued_requests=1"):
        client.completions.create(model="one-seat", prompt="def c():", max_tokens=4)
    assert time.monotonic() - start < 10  # refused at once, not after the others
    aborted = occupancy()["aborted"]
    running.close()  # the client goes away: Serve cancels, the engine aborts and frees its blocks
    wait_until(lambda: occupancy()["aborted"] == aborted + 1, "the abort of the stream whose client left")
    assert list(queued)[-1].finished  # the waiting request took the seat and ran
    wait_until(
        lambda: (
            occupancy() == {"running": 0, "waiting": 0, "aborted": aborted + 1, "free_blocks": free_at_rest}
        ),
        "every cache block back",
    )


def test_engine_and_expert_replicas_report_what_their_kernel_guard_chose(app):
    _, handle, _ = app
    engine_ops = {
        line.split()[0] for line in handle.engine_info.remote("colocated", "v1").result()["kernels"]
    }
    assert {"linear", "experts", "rms_norm", "argmax"} <= engine_ops
    # a disaggregated engine holds no experts; each pool replica guards its own
    remote_ops = {
        line.split()[0] for line in handle.engine_info.remote("disaggregated", "v1").result()["kernels"]
    }
    assert "linear" in remote_ops and "experts" not in remote_ops
    pool = serve.get_deployment_handle("experts-disaggregated-v1-g1", "disaggregated-v1")
    for replica in pool.broadcast("info").results():
        assert [line.split()[:2] for line in replica["kernels"]] == [
            ["experts", "decode"],
            ["experts", "prefill"],
        ]


def test_killing_an_expert_replica_under_load_loses_no_request_and_the_pool_recovers(app, pangu_tiny):
    # Runs last in this module: it kills a replica process (Serve replaces it).
    _, handle, _ = app
    params = dict(max_tokens=200, temperature=0, ignore_eos=True)  # long enough to be mid-flight at the kill
    want = LLM(pangu_tiny, show_progress=False).generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    pool = serve.get_deployment_handle("experts-disaggregated-v1-g1", "disaggregated-v1")
    replicas = pool.broadcast("info").results()
    assert len(replicas) == 2
    streams = [
        handle.options(stream=True, method_name="generate").remote("disaggregated", p, params)
        for p in PROMPTS
    ]
    results: dict[int, list[int]] = {}
    first_tokens = threading.Event()

    def drain(i, stream):
        outs = []
        for out in stream:
            outs.append(out)
            first_tokens.set()
        results[i] = outs[-1].outputs[0].token_ids

    threads = [threading.Thread(target=drain, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    assert first_tokens.wait(timeout=60)  # requests are decoding: kill under load
    victim = replicas[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung after the replica died"
    # every request finished, with the tokens it would have had without the kill (a thread that
    # raised left no result)
    assert results == {i: w.outputs[0].token_ids for i, w in enumerate(want)}

    # Serve starts a new replica, and the engine learns its endpoint and sends it rows
    def replacement_serving():
        try:
            now = pool.broadcast("info").results()
        except ray.exceptions.RayError:  # the dead replica is still listed for a moment
            return False
        fresh = [r for r in now if r["pid"] != victim]
        if len(fresh) < 2:
            return False
        assert generate(handle, "disaggregated", PROMPTS[0]) == want[0].outputs[0].token_ids[:10]
        return all(r["requests_served"] > 0 for r in fresh)

    wait_until(replacement_serving, "the new expert replica serving rows", timeout_s=180, every_s=1)


def test_changing_one_model_restarts_only_that_models_deployments(app):
    # What the operator relies on: one Model's new spec rewrites its own entries of the shared
    # serve config; every other model's engines and expert pools keep their processes.
    config, handle, _ = app

    def engine_pids(model, revisions=("v1",)):
        return {rev: handle.engine_info.remote(model, rev).result()["pid"] for rev in revisions}

    def pool_pids():
        pool = serve.get_deployment_handle("experts-disaggregated-v1-g0", "disaggregated-v1")
        return {r["pid"] for r in pool.broadcast("info").results()}

    others = (engine_pids("colocated"), engine_pids("two-revisions", ("v1", "v2")), pool_pids())
    seat_before = engine_pids("one-seat")
    changed = config.model_copy(deep=True)
    (seat,) = [m for m in changed.models if m.name == "one-seat"]
    seat.revisions[0].engine = seat.revisions[0].engine.model_copy(update={"max_num_batched_tokens": 24})
    deploy(changed)
    assert engine_pids("one-seat") != seat_before  # its engine restarted with the new settings
    assert (engine_pids("colocated"), engine_pids("two-revisions", ("v1", "v2")), pool_pids()) == others
    assert generate(handle, "colocated", PROMPTS[0])  # and the others still serve
