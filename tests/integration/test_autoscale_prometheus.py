"""The operator's Prometheus layer against Debian's real Prometheus server.

The test runs a metrics endpoint of its own (`FakeRayNode`, text exposition over HTTP) that
serves expertmesh's series as a Ray node does, `ray_`-prefixed, with values the test sets;
counters grow at the rates it sets. Prometheus scrapes it every 0.5 s on 127.0.0.1 with the
shipped deployments/prometheus/prometheus.yml (target and intervals changed), whose relabelling
stores them under their `expertmesh_*` names. The real `PrometheusClient` queries it and the
pure autoscaler (`pool_decisions`) and rollout judge (`judge`) decide, over compressed time:
a 2 s rate window, a 3 s scale-down window, 2 s until data is stale.
"""

from __future__ import annotations

import contextlib
import http.server
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from polling import wait_until

from expertmesh.serve.metrics import TPOT_BUCKETS
from expertmesh_operator.crd import AutoscalingTargets, CanaryAnalysis
from expertmesh_operator.pool_autoscale import (
    PoolMetrics,
    Recommendation,
    ReplicaBounds,
    ScaleDecision,
    pool_decisions,
    remember,
)
from expertmesh_operator.prometheus import PrometheusClient
from expertmesh_operator.rollout import judge

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "prometheus" / "prometheus.yml"
SCRAPE_S = 0.5
RATE_WINDOW_S = 2.0
TARGETS = AutoscalingTargets(
    queueDepthPerReplica=4,
    tokensPerSecondPerReplica=100,
    tpotP95Seconds=0.05,
    tolerance=0.2,
    scaleUpStabilizationSeconds=0,
    scaleDownStabilizationSeconds=3,
    maxStepReplicas=4,
    metricsMaxAgeSeconds=2,
)
BOUNDS = ReplicaBounds(min=1, max=12)
PERIOD_S = 0.5  # the operator's interval, compressed
GROUPS = [f"experts-g{g}" for g in range(4)]


# ---- a metrics endpoint whose values the test sets ----------------------------------------------


@dataclass
class Counter:
    value: float = 0.0
    per_second: float = 0.0
    at: float = field(default_factory=time.time)

    def now(self, t: float) -> float:
        self.value += self.per_second * max(0.0, t - self.at)
        self.at = t
        return self.value


Labels = tuple[tuple[str, str], ...]


class FakeRayNode:
    """Serves `ray_expertmesh_*` series as a Ray node's metrics export port does.

    `timestamps`: every sample carries its own timestamp (as a federating or caching exporter's
    do); `frozen_at` then stops time: the same samples, that old, every scrape. `failing`:
    every scrape gets HTTP 503 (a target that is down).
    """

    def __init__(self, timestamps: bool = False):
        self.timestamps = timestamps
        self._lock = threading.Lock()
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.counters: dict[tuple[str, Labels], Counter] = {}
        self.frozen_at: float | None = None
        self.failing = False

    def gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.gauges[(name, tuple(labels.items()))] = value

    def counter(self, name: str, per_second: float, start: float | None = None, **labels: str) -> None:
        """A counter growing at `per_second` from now; `start` sets its value (else it keeps it)."""
        key = (name, tuple(labels.items()))
        with self._lock:
            c = self.counters.setdefault(key, Counter())
            c.now(time.time())
            if start is not None:
                c.value = start
            c.per_second = per_second

    def latency(self, name: str, seconds: float, per_second: float, **labels: str) -> None:
        """A histogram observing `seconds` `per_second` times a second (buckets as the platform's)."""
        for bound in (*TPOT_BUCKETS, math.inf):
            le = "+Inf" if math.isinf(bound) else repr(bound)
            self.counter(f"{name}_bucket", per_second if seconds <= bound else 0.0, **labels, le=le)
        self.counter(f"{name}_count", per_second, **labels)
        self.counter(f"{name}_sum", per_second * seconds, **labels)

    def exposition(self) -> str:
        t = self.frozen_at if self.frozen_at is not None else time.time()
        stamp = f" {int(t * 1000)}" if self.timestamps else ""
        lines = []
        with self._lock:
            samples = [(k, v) for k, v in self.gauges.items()]
            samples += [
                (k, c.value if self.frozen_at is not None else c.now(t)) for k, c in self.counters.items()
            ]
        for (name, labels), value in sorted(samples):
            text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"ray_{name}{{{text}}} {value!r}{stamp}")
        return "\n".join(lines) + "\n"

    # what one pool of one model reports ------------------------------------------------------

    def replicas(self, model: str, revision: str, pool: str, n: int = 1) -> None:
        for i in range(n):
            self.gauge(
                "expertmesh_replica_up", 1, model=model, revision=revision, pool=pool, WorkerId=f"w{i}"
            )

    def engine(
        self, model: str, revision: str, queue: float, running: float = 0.0, tokens_per_s: float = 0.0
    ):
        sel = dict(model=model, revision=revision, pool="engine")
        self.gauge("expertmesh_queue_depth", queue, **sel)
        self.gauge("expertmesh_batch_size", running, **sel)
        self.counter("expertmesh_generation_tokens_total", tokens_per_s * 0.75, **sel)
        self.counter("expertmesh_prompt_tokens_total", tokens_per_s * 0.25, **sel)

    def group_rows(self, model: str, revision: str, pool: str, per_layer: Sequence[float]) -> None:
        """Token rows per second that an expert group takes, in each MoE layer."""
        for layer, rate in enumerate(per_layer):
            sel = dict(model=model, revision=revision, pool=pool, layer=str(layer))
            self.counter("expertmesh_expert_group_tokens_total", rate, **sel)


@contextlib.contextmanager
def serving(fake: FakeRayNode):
    """`fake` on its own HTTP port on 127.0.0.1; sets `fake.address`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if fake.failing:
                self.send_error(503, "metrics agent down")
                return
            body = fake.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="fake-ray-node", daemon=True)
    thread.start()
    fake.address = f"127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Nodes:
    ray: FakeRayNode  # as Ray's export port: no timestamps, Prometheus stamps the scrape time
    cached: FakeRayNode  # samples with their own timestamps, for the stale test to freeze
    flaky: FakeRayNode  # for the target-down test to fail


@pytest.fixture(scope="module")
def nodes():
    with contextlib.ExitStack() as stack:
        yield Nodes(*(stack.enter_context(serving(FakeRayNode(timestamps=t))) for t in (False, True, False)))


@pytest.fixture(scope="module")
def servers(nodes, start_prometheus):
    """Two Prometheus servers scraping the three nodes: the second is for the outage test to stop.

    Both start together, so the few seconds each takes before its first scrape overlap."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"] = {"scrape_interval": f"{int(SCRAPE_S * 1000)}ms"}
    config.pop("rule_files")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [n.address for n in (nodes.ray, nodes.cached, nodes.flaky)]}]
    pair = start_prometheus(config), start_prometheus(config)
    yield pair
    for server in pair:
        server.stop()


def client_of(server) -> PrometheusClient:
    return PrometheusClient(server.url, timeout_s=2.0, rate_window_s=RATE_WINDOW_S, lookback_s=30.0)


@pytest.fixture
def node(nodes):
    return nodes.ray


@pytest.fixture
def client(servers):
    return client_of(servers[0])


# ---- the operator's loop, minus Kubernetes ------------------------------------------------------


@dataclass
class Step:
    at: float
    metrics: dict[str, PoolMetrics]
    decisions: dict[str, ScaleDecision]
    before: dict[str, int]


class Autoscaler:
    """Every interval: ask Prometheus, decide, remember, apply (as the kopf timer does)."""

    def __init__(
        self, client: PrometheusClient, model: str, revision: str, sets: dict[tuple[str, ...], bool]
    ):
        self.client, self.model, self.revision = client, model, revision
        self.sets = sets  # pools decided together -> scale_together
        self.replicas = {pool: 2 for pools in sets for pool in pools}
        self.histories: dict[str, list[Recommendation]] = {}
        self.steps: list[Step] = []

    def decide(self, now: float) -> tuple[dict[str, PoolMetrics], dict[str, ScaleDecision]]:
        metrics = self.client.pool_metrics(self.model, self.revision, list(self.replicas), now)
        decisions: dict[str, ScaleDecision] = {}
        for pools, together in self.sets.items():
            current = {p: self.replicas[p] for p in pools}
            decisions |= pool_decisions(current, metrics, TARGETS, BOUNDS, self.histories, now, together)
        return metrics, decisions

    def step(self) -> Step:
        now = time.time()
        metrics, decisions = self.decide(now)
        step = Step(now, metrics, decisions, dict(self.replicas))
        for pool, d in decisions.items():
            self.histories[pool] = remember(self.histories.get(pool, ()), d, now, TARGETS)
            self.replicas[pool] = d.replicas
        self.steps.append(step)
        return step

    def run_until(self, done: Callable[[Step], bool], timeout_s: float, what: str) -> Step:
        deadline = time.monotonic() + timeout_s
        while True:
            step = self.step()
            if done(step):
                return step
            if time.monotonic() > deadline:
                last = {p: d.reason for p, d in step.decisions.items()}
                pytest.fail(f"no {what} within {timeout_s} s; replicas {self.replicas}, last reasons {last}")
            time.sleep(PERIOD_S)

    def run_for(self, seconds: float) -> list[Step]:
        steps, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            steps.append(self.step())
            time.sleep(PERIOD_S)
        return steps


def reporting(pools: Sequence[str]) -> Callable[[Step], bool]:
    return lambda step: all(step.metrics[p].error is None for p in pools)


def warm_up(
    client: PrometheusClient, model: str, revision: str, pools: Sequence[str], rates: bool = True
) -> None:
    """Wait until every pool reports, and for `rates` until the rate window is full (before,
    rate() extrapolates from too few samples and underestimates)."""
    deadline = time.monotonic() + 20
    while any(m.error for m in client.pool_metrics(model, revision, pools, time.time()).values()):
        assert time.monotonic() < deadline, "the pools' series did not reach Prometheus within 20 s"
        time.sleep(SCRAPE_S / 2)
    if rates:  # samples of every pool reaching back past a full window, as the fixed wait had
        up = f'expertmesh_replica_up{{model="{model}",revision="{revision}"}}'
        span = RATE_WINDOW_S + 2 * SCRAPE_S
        wait_until(
            lambda: held_samples(client, up, 2 * span, "pool", pools) >= span / SCRAPE_S,
            f"{span} s of samples of {model}@{revision}",
        )


def held_samples(
    client: PrometheusClient, selector: str, seconds: float, by: str, among: Sequence[str]
) -> float:
    """The fewest samples Prometheus holds of `selector` over the last `seconds`, among the
    series whose label `by` is in `among` (0 for one it holds none of)."""
    promql = f"count_over_time({selector}[{int(seconds * 1000)}ms])"
    held = {s.metric.get(by): s.number for s in client.vector(promql)}
    return min(held.get(name, 0) for name in among)


def deciding(scaler: Autoscaler, pool: str, why: str) -> Callable[[], bool]:
    """True once the data makes the decision for `pool` give `why` (nothing applied)."""
    return lambda: why in scaler.decide(time.time())[1][pool].reason


def would_scale_down(scaler: Autoscaler, pool: str) -> ScaleDecision:
    """The decision the data gives now, without applying it: the control for a hold test."""
    metrics, decisions = scaler.decide(time.time())
    assert metrics[pool].error is None, metrics[pool]
    assert decisions[pool].replicas < scaler.replicas[pool], decisions[pool].reason
    return decisions[pool]


def assert_holds(scaler: Autoscaler, seconds: float, pool: str, why: str) -> None:
    """Every decision for `seconds` holds, and says why. Holds remember nothing, and the
    history starts empty, so any other decision on this idle pool would scale down at once."""
    before = scaler.replicas[pool]
    steps = scaler.run_for(seconds)
    assert len(steps) >= 3
    for step in steps:
        decision = step.decisions[pool]
        assert decision.hold and decision.replicas == before, decision.reason
        assert why in decision.reason and "holding at" in decision.reason


# ---- autoscaling ---------------------------------------------------------------------------------


def test_scale_up_hold_in_tolerance_and_scale_down_after_the_window(node, client):
    """MoGE: the engine by its queue, the four expert pools together by their token rows."""
    m, rev = "moge", "v1"
    pools = ["engine", *GROUPS]
    for pool in pools:
        node.replicas(m, rev, pool, n=2)
    node.engine(m, rev, queue=24, running=8, tokens_per_s=300)  # 12 per replica vs 4: 3x
    for pool in GROUPS:
        node.group_rows(m, rev, pool, [600, 600])  # 300 rows/s per replica vs 100: 3x
    warm_up(client, m, rev, pools)
    scaler = Autoscaler(client, m, rev, {("engine",): False, tuple(GROUPS): True})

    # scale up, fast: 2 -> 6 in one step (ratio 3, step bound 4), the groups alike
    up = scaler.run_until(lambda s: scaler.replicas != dict.fromkeys(pools, 2), 10, "scale-up")
    assert scaler.replicas == dict.fromkeys(pools, 6), [d.reason for d in up.decisions.values()]
    assert "scale up 2 -> 6: queue depth at 3.00x" in up.decisions["engine"].reason
    assert "scale up 2 -> 6: tokens/s at" in up.decisions["experts-g0"].reason
    assert up.metrics["experts-g0"].tokens_per_second == pytest.approx(600, rel=0.05)

    # 6 replicas carry this load at the target; 12.5% more stays inside the 20% tolerance
    node.engine(m, rev, queue=27, running=8, tokens_per_s=300)
    for pool in GROUPS:
        node.group_rows(m, rev, pool, [675, 675])
    steps = scaler.run_for(RATE_WINDOW_S + 1.5)
    for step in steps:
        assert all(d.replicas == 6 for d in step.decisions.values()), step.decisions
        assert all("within tolerance" in d.reason for d in step.decisions.values()), step.decisions
    last = steps[-1].metrics  # without the tolerance band, ceil(6 x 1.125) = 7
    assert last["engine"].queue_depth == 27 and last["experts-g0"].tokens_per_second == pytest.approx(
        675, rel=0.05
    )

    # load gone: scale-down waits until no recommendation of the window asked for more
    node.engine(m, rev, queue=0, running=0, tokens_per_s=0)
    for pool in GROUPS:
        node.group_rows(m, rev, pool, [0, 0])
    low_since = time.time()
    scaler.run_until(lambda s: scaler.replicas == dict.fromkeys(pools, 1), 20, "scale-down to 1")
    window = TARGETS.scale_down_stabilization_seconds
    for pool in ("engine", "experts-g0"):
        down = next(s for s in scaler.steps if s.decisions[pool].replicas < s.before[pool])
        assert down.before[pool] == 6 and "scale down 6 -> " in down.decisions[pool].reason
        last_high = max(
            s.at for s in scaler.steps
            if s.decisions[pool].recommendation is not None and s.decisions[pool].recommendation >= 6
        )  # fmt: skip
        assert down.at - last_high > window and down.at - low_since > window
        waited = [s for s in scaler.steps if last_high < s.at < down.at]
        assert waited, "no decision between the last high recommendation and the scale-down"
        for s in waited:
            assert "keep 6: " in s.decisions[pool].reason
            assert f"but the last {window}s recommended up to 6" in s.decisions[pool].reason
    for step in scaler.steps:  # MoGE pools never drift apart
        assert len({step.decisions[p].replicas for p in GROUPS}) == 1


def test_topk_pools_scale_by_their_own_load(node, client):
    m, rev = "topk", "v1"
    pools = GROUPS[:3]
    for pool in pools:
        node.replicas(m, rev, pool, n=2)
    node.group_rows(m, rev, "experts-g0", [500, 700])  # hot: 600 rows/s per layer, 3x
    node.group_rows(m, rev, "experts-g1", [190, 210])  # at target
    node.group_rows(m, rev, "experts-g2", [50, 50])  # cold, but 50% below: the window keeps it
    warm_up(client, m, rev, pools)
    scaler = Autoscaler(client, m, rev, {tuple(pools): False})
    scaler.histories = {p: [Recommendation(at=time.time(), replicas=2)] for p in pools}
    step = scaler.step()
    assert [step.metrics[p].tokens_per_second for p in pools] == [
        pytest.approx(600, rel=0.05),  # the mean over MoE layers
        pytest.approx(200, rel=0.05),
        pytest.approx(50, rel=0.05),
    ]
    assert {p: d.replicas for p, d in step.decisions.items()} == {
        "experts-g0": 6,
        "experts-g1": 2,
        "experts-g2": 2,
    }, [d.reason for d in step.decisions.values()]
    assert "within tolerance" in step.decisions["experts-g1"].reason
    assert "recommends 1" in step.decisions["experts-g2"].reason
    # the same data decided as MoGE pools: one decision, from the most loaded group, for all
    together = pool_decisions(step.before, step.metrics, TARGETS, BOUNDS, {}, step.at, scale_together=True)
    assert {p: d.replicas for p, d in together.items()} == dict.fromkeys(pools, 6)


def test_signals_queue_ongoing_tokens_and_tpot_p95(node, client):
    m, rev = "signals", "v3"
    node.replicas(m, rev, "engine")
    node.replicas(m, rev, "experts-g0")
    node.engine(m, rev, queue=3, running=5, tokens_per_s=200)
    node.latency("expertmesh_time_per_output_token_seconds", 0.2, 10, model=m, revision=rev, pool="engine")
    warm_up(client, m, rev, ["engine", "experts-g0"])
    scaler = Autoscaler(client, m, rev, {("engine",): False, ("experts-g0",): False})
    step = scaler.step()
    engine = step.metrics["engine"]
    assert (engine.queue_depth, engine.ongoing_requests) == (3, 8)  # ongoing: running + waiting
    assert engine.tokens_per_second == pytest.approx(200, rel=0.05)  # prompt + generated
    # every observation in the (0.1, 0.25] bucket: p95 interpolates to 0.1 + 0.15 x 0.95
    assert engine.tpot_p95_seconds == pytest.approx(0.2425)
    assert 0 <= step.at - engine.sampled_at < 2 * SCRAPE_S + 0.5  # the sample's own timestamp
    expert = step.metrics["experts-g0"]
    assert expert.tpot_p95_seconds == engine.tpot_p95_seconds  # the group is on the decode path too
    assert (expert.queue_depth, expert.ongoing_requests, expert.tokens_per_second) == (None, None, None)
    assert step.decisions["engine"].replicas == 6  # ceil(2 x 4.85), bounded by the step of 4
    assert "TPOT p95 at 4.85x target" in step.decisions["engine"].reason


def idle_at_four(node: FakeRayNode, client: PrometheusClient, model: str) -> Autoscaler:
    """An idle engine pool at 4 replicas, its data in Prometheus, and no history: the data says 4 -> 1."""
    node.replicas(model, "v1", "engine")
    node.engine(model, "v1", queue=0)
    scaler = Autoscaler(client, model, "v1", {("engine",): False})
    scaler.replicas["engine"] = 4
    warm_up(client, model, "v1", ["engine"], rates=False)
    assert would_scale_down(scaler, "engine").replicas == 1
    return scaler


def test_prometheus_outage_holds(node, servers):
    spare = servers[1]
    client = client_of(spare)
    scaler = idle_at_four(node, client, "outage")

    spare.stop()
    assert_holds(scaler, 2, "engine", "metrics query failed: cannot reach Prometheus")
    assert client.canary_analysis("outage", "v1", "v2", time.time() - 10, time.time()) is None


def test_stale_samples_hold(nodes, client):
    scaler = idle_at_four(nodes.cached, client, "frozen")

    # the target keeps answering with the same samples, carrying their old timestamps
    nodes.cached.frozen_at = time.time()
    wait_until(deciding(scaler, "engine", "metrics are stale"), "the frozen samples turning stale")
    assert_holds(scaler, 2, "engine", "metrics are stale")
    assert scaler.steps[-1].metrics["engine"].sampled_at == pytest.approx(nodes.cached.frozen_at, abs=0.002)


def test_target_down_holds(nodes, client):
    scaler = idle_at_four(nodes.flaky, client, "down")

    # scrapes fail: Prometheus marks the target's series stale and queries stop returning them
    nodes.flaky.failing = True
    why = "no expertmesh_replica_up sample for pool engine of down@v1"
    wait_until(deciding(scaler, "engine", why), "the failing target's series marked stale")
    assert_holds(scaler, 2, "engine", why)


# ---- canary analysis -----------------------------------------------------------------------------


def requests_at(
    node: FakeRayNode, model: str, revision: str, per_second: float, error_ratio: float, start=None
):
    sel = dict(model=model, revision=revision, pool="engine")
    node.counter(
        "expertmesh_requests_total", per_second * (1 - error_ratio), None if start is None else start[0],
        **sel, outcome="stop",
    )  # fmt: skip
    node.counter(
        "expertmesh_requests_total", per_second * error_ratio, None if start is None else start[1],
        **sel, outcome="error",
    )  # fmt: skip
    node.counter("expertmesh_requests_total", 5.0, **sel, outcome="rejected")  # never counted


def wait_for_scrapes(client: PrometheusClient, revision: str, models: Sequence[str], scrapes: int) -> None:
    """Until Prometheus holds `scrapes` samples of every model's `revision` requests in the last
    30 s (a fixed sleep raced the first scrape on a loaded machine)."""
    selector = f'expertmesh_requests_total{{revision="{revision}",outcome="stop"}}'
    wait_until(
        lambda: held_samples(client, selector, 30, "model", models) >= scrapes,
        f"{revision} series scraped {scrapes}x",
    )


def test_canary_analysis_against_thresholds(node, client):
    thresholds = CanaryAnalysis(maxErrorRatio=0.01, maxP95LatencyRatio=1.25, minRequests=10)
    tpot = "expertmesh_time_per_output_token_seconds"
    cases = {  # model: canary error ratio, canary TPOT
        "erring": (0.10, 0.02),
        "slow": (0.005, 0.2),
        "good": (0.005, 0.02),
    }
    for m in cases:
        requests_at(node, m, "v1", 40, 0.005)
        node.latency(tpot, 0.02, 20, model=m, revision="v1", pool="engine")
    wait_for_scrapes(client, "v1", list(cases), 3)  # stable has samples before the window
    window_start = time.time()
    for m, (errors, seconds) in cases.items():
        requests_at(node, m, "v2", 20, errors)
        node.latency(tpot, seconds, 10, model=m, revision="v2", pool="engine")
    # a canary born with its failures: 5 of its first 10 requests failed before the first scrape
    requests_at(node, "burst", "v1", 40, 0.005)
    requests_at(node, "burst", "v2", 0, 0, start=(5, 5))
    wait_for_scrapes(client, "v2", [*cases, "burst"], 6)  # about 3 s of the canary's window
    now = time.time()

    results = {m: client.canary_analysis(m, "v1", "v2", window_start, now) for m in [*cases, "burst"]}
    for m, result in results.items():
        assert result is not None and result.window_start == window_start
        assert result.stable_error_ratio == pytest.approx(0.005, abs=0.002), m
    for m, (errors, _) in cases.items():
        r = results[m]
        # 20 admitted a second since the window began, to the last scrape (rejected ones not counted)
        assert (
            20 * (now - window_start - 2 * SCRAPE_S) - 1 <= r.canary_requests <= 20 * (now - window_start) + 1
        )
        assert r.canary_error_ratio == pytest.approx(errors, abs=0.002), m
        assert r.canary_p95_seconds is not None and r.stable_p95_seconds is not None
        assert r.canary_p95_seconds / r.stable_p95_seconds == pytest.approx(
            (0.1 + 0.15 * 0.95) / (0.01 + 0.015 * 0.95) if m == "slow" else 1.0
        )
    assert "error ratio" in judge(results["erring"], thresholds)
    assert "p95 latency" in judge(results["slow"], thresholds)
    assert judge(results["good"], thresholds) is None
    burst = results["burst"]
    assert (burst.canary_requests, burst.canary_error_ratio) == (10, 0.5)  # increase() would say 0
    assert "error ratio" in judge(burst, thresholds)
