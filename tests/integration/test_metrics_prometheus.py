"""expertmesh_* metrics end to end: a real Ray + Serve app, Debian's Prometheus scraping Ray's port.

Ray exports every process's metrics on the node's metrics export port, which the test picks
(`ray.init(_metrics_export_port=...)`), with a 1 s report interval instead of 10 s. Prometheus
runs as a plain process on 127.0.0.1 with deployments/prometheus/prometheus.yml (its target and
intervals changed for the test) and its rules, and is stopped after. Also here: promtool checks
of the shipped config and rules, and the Grafana dashboard's queries.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from fake_kube import FakeKubernetesApi
from ray import serve

from expertmesh.config import ServeConfig
from expertmesh.model.loader import load_config
from expertmesh.serve.app import deploy
from expertmesh.serve.metrics import SERIES, metrics_endpoints, stored_series_names
from expertmesh.serve_layout import APP_NAME, all_deployments, platform_config
from expertmesh_operator.crd import ModelResourceStatus
from expertmesh_operator.operator_settings import OperatorSettings
from expertmesh_operator.prometheus import PrometheusClient
from expertmesh_operator.reconcile_round import reconcile_once

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deployments" / "prometheus"
RULE_FILES = [PROM_DIR / "rules" / "recording.yml", PROM_DIR / "rules" / "alerts.yml"]
DASHBOARD = ROOT / "deployments" / "grafana" / "expertmesh-dashboard.json"
MODEL = "pangu"
PROMPTS = ["def main():", "import os\nimport sys", "class Pool:"]
MAX_TOKENS = 8
NAME = re.compile(r"\bexpertmesh[_:][a-zA-Z0-9_:]*")


def recording_rules() -> dict[str, str]:
    return {
        rule["record"]: rule["expr"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def rule_exprs() -> list[str]:
    return [
        rule["expr"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, as Prometheus would get it."""
    expr = re.sub(r"label_values\((.*), *\w+\)$", r"\1", expr)  # templating: its series selector
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$revision", ".*")


# ---- the shipped files --------------------------------------------------------------


def test_promtool_accepts_the_config_and_rules(promtool):
    subprocess.run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")], check=True)
    subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], check=True)
    # the alerts' own unit tests: top-k imbalance fires, MoGE does not, error ratio, queue
    subprocess.run([promtool, "test", "rules", str(PROM_DIR / "tests" / "rules_test.yml")], check=True)


def test_rules_and_dashboard_use_only_series_that_exist(tmp_path, promtool):
    known = stored_series_names() | set(recording_rules())
    used: set[str] = set()
    for expr in rule_exprs() + dashboard_exprs():
        names = set(NAME.findall(expr))
        assert names, f"expression uses no expertmesh series: {expr}"
        assert names <= known, f"unknown series {sorted(names - known)} in: {expr}"
        used |= names
    for s in SERIES:  # every exported series is used by a rule or a panel
        assert any(u.startswith(s.name) for u in used), f"{s.name} is exported but nothing uses it"
    # promtool parses each dashboard query, as a recording rule
    checks = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, expr in enumerate(dashboard_exprs()):
        checks["groups"][0]["rules"].append({"record": f"dashboard:query_{i}", "expr": as_promql(expr)})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(checks))
    subprocess.run([promtool, "check", "rules", str(path)], check=True)


def test_dashboard_is_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "expertmesh" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "model", "revision"}


def test_podmonitor_renames_like_the_scrape_config():
    scrape = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    monitor = yaml.safe_load((PROM_DIR / "podmonitor.yaml").read_text())
    (relabel,) = monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
    (want,) = scrape["metric_relabel_configs"]
    assert (relabel["regex"], relabel["replacement"], relabel["targetLabel"]) == (
        want["regex"],
        want["replacement"],
        want["target_label"],
    )


# ---- live: Ray, Serve, Prometheus ---------------------------------------------------


@pytest.fixture(scope="module")
def ray_metrics_port(free_port):
    port = free_port()
    ray.init(
        address="local",  # a fresh instance, never another session's cluster on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},  # Ray's default is 10 s
    )
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    assert [url.rsplit(":", 1)[1] for url in metrics_endpoints()] == [f"{port}/metrics"]
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def prometheus(ray_metrics_port, start_prometheus):
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(p) for p in RULE_FILES]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{ray_metrics_port}"]}]
    server = start_prometheus(config)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def served(prometheus, pangu_tiny):
    config = ServeConfig.parse(
        {
            "models": [
                {
                    "name": MODEL,
                    "revisions": [{"source": str(pangu_tiny), "expert_parallel": {"enabled": True}}],
                }
            ]
        }
    )
    deploy(config)
    handle = serve.get_app_handle(APP_NAME)
    finals = []
    for i, prompt in enumerate(PROMPTS):
        stream = handle.options(stream=True, method_name="generate").remote(
            MODEL, prompt, dict(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        )
        finals.append(list(stream)[-1])
        if i == 0:
            # Let Prometheus see the counters before the rest: rate() needs an increase after a
            # series' first sample, else the rate rules answer 0 (and their ratios NaN).
            poll(lambda: query(prometheus, f'expertmesh_expert_group_tokens_total{{model="{MODEL}"}}'))
    with pytest.raises(Exception, match="max_tokens"):  # refused at the engine: outcome "rejected"
        list(handle.options(stream=True, method_name="generate").remote(MODEL, "x", dict(max_tokens=0)))
    return finals


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10
    ) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def values(url: str, promql: str, by: str) -> dict[str, float]:
    return {r["metric"].get(by, ""): float(r["value"][1]) for r in query(url, promql)}


def poll(check, timeout: float = 60.0):
    """Call check() until it returns truthy without an AssertionError, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            assert result is None or result, "not yet"
            return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_prometheus_scrapes_expertmesh_series_with_their_labels(prometheus, served, pangu_tiny):
    generated = sum(len(f.outputs[0].token_ids) for f in served)
    prompt_tokens = sum(len(f.prompt_token_ids) for f in served)
    assert generated == MAX_TOKENS * len(PROMPTS)
    cfg = load_config(pangu_tiny)
    groups = cfg.moe.num_routing_groups
    pools = [f"experts-g{g}" for g in range(groups)]
    moe_layers = cfg.num_layers  # every layer of the tiny pangu is a MoE layer
    # MoGE: every token fed to the model takes one expert of each group, in every MoE layer;
    # a request's last token is sampled but never fed back.
    fed = prompt_tokens + generated - len(PROMPTS)
    sel = f'model="{MODEL}",revision="v1"'

    def engine_series_arrived():
        assert values(prometheus, f"sum(expertmesh_generation_tokens_total{{{sel}}})", "") == {"": generated}
        assert values(prometheus, f"sum(expertmesh_prompt_tokens_total{{{sel}}})", "") == {"": prompt_tokens}
        queried = values(prometheus, f"sum(expertmesh_prefix_cache_queries_total{{{sel}}})", "")
        assert queried == {"": prompt_tokens}  # every admitted prompt token was looked up
        assert values(
            prometheus, f'sum by (outcome) (expertmesh_requests_total{{{sel},pool="engine"}})', "outcome"
        ) == {"length": len(PROMPTS), "rejected": 1}
        tokens = values(prometheus, f"sum by (pool) (expertmesh_expert_group_tokens_total{{{sel}}})", "pool")
        assert tokens == {pool: fed * moe_layers for pool in pools}  # equal across groups: MoGE
        rows = values(prometheus, f"sum by (pool) (expertmesh_expert_replica_rows_total{{{sel}}})", "pool")
        assert rows == tokens  # one replica per pool got all of its group's rows

    poll(engine_series_arrived)

    (series,) = query(prometheus, f"expertmesh_generation_tokens_total{{{sel}}}")
    labels = series["metric"]
    assert (labels["model"], labels["revision"], labels["pool"]) == (MODEL, "v1", "engine")
    assert labels["application"] == f"{MODEL}-v1" and labels["deployment"] == f"engine-{MODEL}-v1"
    assert not query(prometheus, '{__name__=~"ray_expertmesh_.*"}')  # the scrape config renamed them

    imbalance = values(prometheus, f"expertmesh_expert_group_imbalance{{{sel}}}", "layer")
    assert imbalance == {str(layer): 1.0 for layer in range(moe_layers)}
    assert values(prometheus, f"expertmesh_pool_replica_imbalance{{{sel}}}", "pool") == dict.fromkeys(
        pools, 1.0
    )
    experts = values(prometheus, f"sum by (expert) (expertmesh_expert_tokens_total{{{sel}}})", "expert")
    assert sum(experts.values()) == fed * moe_layers * groups
    assert set(experts) <= {str(e) for e in range(cfg.moe.num_experts)}
    ttft = values(prometheus, f"sum(expertmesh_time_to_first_token_seconds_count{{{sel}}})", "")
    tpot = values(prometheus, f"sum(expertmesh_time_per_output_token_seconds_count{{{sel}}})", "")
    assert ttft == tpot == {"": len(PROMPTS)}
    idle = {"expertmesh_batch_size": 0, "expertmesh_queue_depth": 0, "expertmesh_kv_cache_usage_ratio": 0}
    for name, want in idle.items():
        poll(lambda name=name, want=want: values(prometheus, f"{name}{{{sel}}}", "pool") == {"engine": want})
    # what each replica's kernel guard chose: the engine's ops, and each pool's fused experts
    paths = query(prometheus, f"expertmesh_kernel_path{{{sel}}}")
    assert {(p["metric"]["pool"], p["metric"]["op"]) for p in paths} >= {
        ("engine", "linear"),
        ("experts-g0", "experts"),
    }
    assert {p["metric"]["path"] for p in paths} <= {"native", "torch"}
    (info,) = query(prometheus, f"expertmesh_model_info{{{sel}}}")
    assert {k: info["metric"][k] for k in ("routing", "groups", "mode")} == {
        "routing": "moge",
        "groups": str(groups),
        "mode": "disaggregated",
    }


def test_recording_rules_alerts_and_dashboard_queries_evaluate(prometheus, served):
    sel = f'model="{MODEL}",revision="v1"'

    def rules_evaluated():
        replicas = values(prometheus, f"expertmesh:pool_replicas:sum{{{sel}}}", "pool")
        assert replicas == {"engine": 1.0, **{f"experts-g{g}": 1.0 for g in range(4)}}
        assert values(prometheus, f"expertmesh:expert_group_imbalance:rate5m{{{sel}}}", "") == {
            "": pytest.approx(1.0)
        }
        assert values(prometheus, f"expertmesh:expert_group_imbalance:max_layer{{{sel}}}", "") == {"": 1.0}

    poll(rules_evaluated)
    # A healthy MoGE deployment: balanced groups and replicas, no errors. (Latency alerts depend
    # on how busy this machine is, so they are not asserted.) Once in a full run here the MoGE
    # balance alert was pending, not firing, when first read: a scrape need not see an engine's
    # flush of its per-pool counters whole, so for an evaluation one pool's rate can lead
    # another's; `for: 5m` keeps that from firing. It must clear.
    quiet = {"ExpertmeshMoGEBalanceBroken", "ExpertmeshExpertGroupImbalance", "ExpertmeshRequestErrors"}
    quiet |= {"ExpertmeshPoolReplicaImbalance", "ExpertmeshQueueSaturated", "ExpertmeshKVCacheFull"}

    def alerts_quiet():
        with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as r:
            groups = json.loads(r.read())["data"]["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        assert len(rules) == len(rule_exprs())
        assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
        states = {r["name"]: r["state"] for r in rules if r["type"] == "alerting"}
        assert quiet <= set(states)
        assert {name: states[name] for name in quiet} == dict.fromkeys(quiet, "inactive")

    poll(alerts_quiet, timeout=20.0)
    answered = [expr for expr in dashboard_exprs() if query(prometheus, as_promql(expr))]
    assert len(answered) >= len(dashboard_exprs()) // 2, "most dashboard panels should show data"


# ---- the operator's own round against this Prometheus ---------------------------------------


class Load:
    """Requests for MODEL sent one after another through the Router, in a thread, while open."""

    def __init__(self, handle):
        self.handle, self.sent, self.error = handle, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        params = dict(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        try:
            while not self._stop.is_set():
                call = self.handle.options(stream=True, method_name="generate")
                outputs = list(call.remote(MODEL, PROMPTS[0], params))
                assert outputs[-1].finished
                self.sent += 1
        except BaseException as exc:  # handed to the test by __exit__
            self.error = exc

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=120)
        if self.error is not None and exc[0] is None:
            raise AssertionError(f"a request of the load failed: {self.error!r}") from self.error


def rounds_until(fake, prometheus_client, done, what: str, timeout: float = 120.0):
    """The operator's round, once a second with the wall-clock time Prometheus stamps samples
    with, until `done(fake)`; fails naming `what` and the events so far."""
    settings = OperatorSettings()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = reconcile_once(fake, prometheus_client, settings, time.time())
        assert not report.errors, report.errors
        if done(fake):
            return
        time.sleep(1.0)
    pytest.fail(f"{what}: not within {timeout:.0f} s; events: {[(e.reason, e.message) for e in fake.events]}")


def operator_serve_config(fake) -> dict:
    return yaml.safe_load(fake.rayservices[("default", "expertmesh")]["spec"]["serveConfigV2"])


def test_the_operators_round_scales_a_pool_and_judges_a_canary_from_this_prometheus(
    prometheus, served, pangu_tiny
):
    """The production round (reconcile_once with the real PrometheusClient) reads the series the
    live app exports, as scraped by the real Prometheus: a busy pool scales up, and a canary that
    serves its share of requests passes analysis. The Kubernetes API is the in-memory FAKE (no
    API server runs in CI; tests/e2e runs the operator against a real one); the serve config the
    round writes is applied to the live Serve as KubeRay applies a RayService's serveConfigV2.
    Runs last in this module: the canary redeploys the app."""
    client = PrometheusClient(prometheus, rate_window_s=10.0, lookback_s=60.0)
    handle = serve.get_app_handle(APP_NAME)
    source = {"checkpoint": str(pangu_tiny)}

    # 1. scale-up: the Model the live app serves, with a target its load exceeds
    fake = FakeKubernetesApi()
    fake.apply_model(
        MODEL,
        {
            "source": source,
            "expertParallel": {"enabled": True, "maxReplicasPerGroup": 2},
            "autoscaling": {"tokensPerSecondPerReplica": 1, "metricsMaxAgeSeconds": 30},
        },
    )
    with Load(handle):

        def scaled_up(fake):
            return "ScaledUp" in [e.reason for e in fake.events]

        rounds_until(fake, client, scaled_up, "a pool scaled up from its measured load")
    status = ModelResourceStatus.model_validate(fake.model(MODEL)["status"])
    scaled = {pool: n for pool, n in status.replicas_per_pool.items() if n > 1}
    assert scaled and status.condition("ScalingActive").status == "True"
    written = all_deployments(operator_serve_config(fake))
    assert all(written[pool]["num_replicas"] == n for pool, n in scaled.items())

    # 2. a canary: v2 (colocated: one process, cheap here) takes half the traffic, and passes
    fake = FakeKubernetesApi()
    spec = {
        "source": source,
        "expertParallel": {"enabled": True},
        "autoscaling": {"enabled": False},
        "rollout": {
            "canary": {
                "steps": [50, 100],
                "pauseSeconds": 3,
                # latency on two shared cores says nothing about a revision: judge errors
                "analysis": {"minRequests": 3, "maxP95LatencyRatio": 100},
            }
        },
    }
    fake.apply_model(MODEL, spec)
    reconcile_once(fake, client, OperatorSettings(), time.time())
    fake.apply_model(MODEL, {**spec, "version": "v2", "expertParallel": {"enabled": False}})
    reconcile_once(fake, client, OperatorSettings(), time.time())
    assert [e.reason for e in fake.events if e.reason == "CanaryStarted"] == ["CanaryStarted"], [
        (e.reason, e.message) for e in fake.events
    ]
    deploy(platform_config(operator_serve_config(fake)))  # what KubeRay does with serveConfigV2
    with Load(handle) as load:

        def promoted(fake):
            return "Promoted" in [e.reason for e in fake.events]

        rounds_until(fake, client, promoted, "the canary judged and promoted")
    assert load.sent >= 3
    status = ModelResourceStatus.model_validate(fake.model(MODEL)["status"])
    assert status.rollout.phase == "Stable" and status.rollout.stable.name == "v2"
    assert not [e for e in fake.events if e.reason == "RolledBack"]
