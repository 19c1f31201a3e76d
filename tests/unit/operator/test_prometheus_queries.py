"""The Prometheus layer's pure parts: PromQL builders, answer parsing, counting, quantiles.

The client itself runs against the real Prometheus in tests/integration/test_autoscale_prometheus.py;
here it meets only a closed port and `FakeGet`, a stand-in for `requests.get` that answers
canned bodies, so its failure paths are checked without a server.
"""

from __future__ import annotations

import json
import math

import pytest

from expertmesh_operator import prometheus as prom
from expertmesh_operator.crd import AutoscalingTargets
from expertmesh_operator.pool_autoscale import ReplicaBounds, pool_decisions
from expertmesh_operator.prometheus import (
    MatrixSeries,
    PrometheusClient,
    PrometheusError,
    analysis_from,
    assemble_pool_metrics,
    counter_increase,
    duration,
    freshness_query,
    histogram_quantile,
    latency_range_query,
    ongoing_requests_query,
    parse_response,
    pool_selector,
    queue_depth_query,
    requests_range_query,
    tokens_per_second_query,
    tpot_p95_query,
)

SEL = 'model="pangu",revision="v2",pool=~"engine|experts-g0"'
NOW = 1_700_000_000.0


# ---- PromQL -------------------------------------------------------------------------------------


def test_duration_is_whole_milliseconds():
    assert [duration(s) for s in (60, 2.5, 0.0001)] == ["60000ms", "2500ms", "1ms"]


def test_selector_sorts_pools_and_escapes_values():
    assert pool_selector("pangu", "v2", ["experts-g0", "engine"]) == SEL
    # a dot is a regex character in a pool name; a quote and a backslash end or escape the literal
    assert pool_selector('we"ird', "a\\b", ["p.1"]) == r'model="we\"ird",revision="a\\b",pool=~"p\\.1"'


def test_pool_queries():
    pools = ["engine", "experts-g0"]
    assert freshness_query("pangu", "v2", pools) == (
        f"min by (pool) (timestamp(expertmesh_replica_up{{{SEL}}}))"
    )
    assert queue_depth_query("pangu", "v2", pools) == f"sum by (pool) (expertmesh_queue_depth{{{SEL}}})"
    assert ongoing_requests_query("pangu", "v2", pools) == (
        f'sum by (pool) ({{__name__=~"expertmesh_batch_size|expertmesh_queue_depth",{SEL}}})'
    )
    assert tokens_per_second_query("pangu", "v2", pools, 60) == (
        f"(sum by (pool) (rate(expertmesh_prompt_tokens_total{{{SEL}}}[60000ms]))"
        f" + sum by (pool) (rate(expertmesh_generation_tokens_total{{{SEL}}}[60000ms])))"
        f" or avg by (pool) (sum by (pool, layer) (rate(expertmesh_expert_group_tokens_total{{{SEL}}}[60000ms])))"
    )
    assert tpot_p95_query("pangu", "v2", 30) == (
        'histogram_quantile(0.95, sum by (le) (rate(expertmesh_time_per_output_token_seconds_bucket{model="pangu",revision="v2"}[30000ms])))'
    )


def test_canary_range_queries():
    assert requests_range_query("pangu", ["v2", "v1"], 390) == (
        'expertmesh_requests_total{model="pangu",revision=~"v1|v2",pool="engine",outcome!="rejected"}[390000ms]'
    )
    assert latency_range_query("pangu", ["v1", "v2"], 390) == (
        'expertmesh_time_per_output_token_seconds_bucket{model="pangu",revision=~"v1|v2"}[390000ms]'
    )


# ---- answers ------------------------------------------------------------------------------------


def vector_body(*samples: tuple[dict, str]) -> str:
    result = [{"metric": m, "value": [NOW, v]} for m, v in samples]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def test_parse_vector_with_nan_and_inf():
    data = parse_response(
        200, vector_body(({"pool": "engine"}, "3"), ({"pool": "x"}, "NaN"), ({}, "+Inf")), "q"
    )
    assert data.result_type == "vector"
    values = [s.number for s in data.result]
    assert values[0] == 3 and math.isnan(values[1]) and values[2] == math.inf


def test_parse_matrix():
    body = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [{"metric": {"le": "0.1"}, "values": [[1.5, "2"], [2.5, "4"]]}],
        },
    }
    (series,) = parse_response(200, json.dumps(body), "q").result
    assert isinstance(series, MatrixSeries) and series.points == [(1.5, 2.0), (2.5, 4.0)]


@pytest.mark.parametrize(
    "status, body, says",
    [
        (
            422,
            '{"status":"error","errorType":"execution","error":"vector cannot contain metrics with the same labelset"}',
            "execution: vector cannot contain",
        ),
        (400, '{"status":"error","errorType":"bad_data","error":"parse error"}', "bad_data: parse error"),
        (502, "<html><body>Bad Gateway</body></html>", "HTTP 502"),
        (200, "not json at all", "unreadable answer"),
        (200, '{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}', "unreadable"),
    ],
)
def test_parse_failures_say_what_was_wrong(status, body, says):
    with pytest.raises(PrometheusError, match="the_query") as raised:
        parse_response(status, body, "the_query")
    assert says in str(raised.value)


# ---- pool metrics -------------------------------------------------------------------------------


def test_assemble_pool_metrics():
    pools = ["engine", "experts-g0", "experts-g1"]
    out = assemble_pool_metrics(
        pools,
        freshness={"engine": NOW - 3, "experts-g0": NOW - 1},
        queue_depth={"engine": 7},
        ongoing={"engine": 9},
        tokens_per_second={"engine": 120.0, "experts-g0": math.nan},
        tpot_p95=0.04,
        now=NOW,
        what=" of pangu@v2",
    )
    engine, g0, g1 = (out[p] for p in pools)
    assert (engine.sampled_at, engine.queue_depth, engine.ongoing_requests, engine.tokens_per_second) == (
        NOW - 3,
        7,
        9,
        120.0,
    )
    assert engine.tpot_p95_seconds == g0.tpot_p95_seconds == 0.04 and engine.error is None
    assert (g0.queue_depth, g0.tokens_per_second, g0.error) == (None, None, None)  # NaN: no value
    assert (
        g1.error is not None and "no expertmesh_replica_up sample for pool experts-g1 of pangu@v2" in g1.error
    )


class FakeGet:
    """Stands in for requests.get: answers each query by the first builder prefix it starts with."""

    def __init__(self, answers: dict[str, tuple[int, str]]):
        self.answers, self.calls = answers, []

    def __call__(self, url, params, timeout):
        self.calls.append((url, params, timeout))
        for prefix, (status, body) in self.answers.items():
            if params["query"].startswith(prefix):
                return type("Reply", (), {"status_code": status, "content": body.encode()})()
        return type("Reply", (), {"status_code": 200, "content": vector_body().encode()})()


def test_pool_metrics_wiring(monkeypatch):
    fake = FakeGet(
        {
            "min by (pool) (timestamp(": (200, vector_body(({"pool": "engine"}, str(NOW - 2)))),
            "sum by (pool) (expertmesh_queue_depth": (200, vector_body(({"pool": "engine"}, "5"))),
            "histogram_quantile": (200, vector_body(({}, "0.07"))),
        }
    )
    monkeypatch.setattr(prom.requests, "get", fake)
    client = PrometheusClient("http://prom:9090/", timeout_s=1.5, rate_window_s=30)
    out = client.pool_metrics("pangu", "v2", ["engine", "experts-g0"], NOW)
    assert out["engine"].model_dump() == {
        "sampled_at": NOW - 2,
        "queue_depth": 5,
        "ongoing_requests": None,
        "tokens_per_second": None,
        "tpot_p95_seconds": 0.07,
        "error": None,
    }
    assert "no expertmesh_replica_up sample" in out["experts-g0"].error
    assert {url for url, _, _ in fake.calls} == {"http://prom:9090/api/v1/query"}
    assert all(p["time"] == f"{NOW:.3f}" and t == 1.5 for _, p, t in fake.calls)
    assert any("[30000ms]" in p["query"] for _, p, _ in fake.calls)


def test_a_failing_query_fails_every_pool_and_the_autoscaler_holds(monkeypatch):
    fake = FakeGet({"sum by (pool) (expertmesh_queue_depth": (503, "Service Unavailable")})
    monkeypatch.setattr(prom.requests, "get", fake)
    pools = ["experts-g0", "experts-g1"]
    out = PrometheusClient("http://prom:9090").pool_metrics("pangu", "v2", pools, NOW)
    assert all("HTTP 503" in m.error for m in out.values())
    decisions = pool_decisions(
        dict.fromkeys(pools, 3), out, AutoscalingTargets(), ReplicaBounds(min=1, max=8), {}, NOW, True
    )
    assert all(d.hold and d.replicas == 3 for d in decisions.values())
    assert decisions["experts-g0"].reason.count("HTTP 503") == 1  # said once, not once per pool


def test_unreachable_prometheus(free_port):
    client = PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    out = client.pool_metrics("pangu", "v2", ["engine"], NOW)
    assert out["engine"].error.startswith("cannot reach Prometheus at http://127.0.0.1:")
    assert out["engine"].sampled_at == NOW
    assert client.canary_analysis("pangu", "v1", "v2", NOW - 60, NOW) is None
    assert client.pool_metrics("pangu", "v2", [], NOW) == {}


# ---- canary counting ----------------------------------------------------------------------------


def test_counter_increase_from_the_baseline_before_the_window():
    assert counter_increase([(90, 10), (100, 12), (110, 15), (120, 21)], since=100) == 9


def test_counter_born_in_the_window_counts_from_zero():
    # increase() would drop the first sample's 5
    assert counter_increase([(105, 5), (115, 5)], since=100) == 5


def test_counter_reset_counts_the_new_value():
    assert counter_increase([(95, 10), (105, 14), (115, 3), (125, 6)], since=100) == 4 + 3 + 3


def test_counter_without_samples_in_the_window():
    assert counter_increase([(80, 10), (90, 12)], since=100) == 0
    assert counter_increase([], since=100) == 0


INF = math.inf


def test_histogram_quantile_interpolates_like_prometheus():
    # 100 observations: 50 in (0, 0.1], 50 in (0.1, 0.25]
    buckets = {0.1: 50, 0.25: 100, 0.5: 100, INF: 100}
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.1 + 0.15 * 45 / 50)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # first bucket starts at 0


def test_histogram_quantile_edges():
    assert histogram_quantile(0.95, {0.1: 0, 0.25: 10, INF: 100}) == 0.25  # in +Inf: the top finite bound
    assert histogram_quantile(0.95, {0.1: 0, INF: 0}) is None  # nothing observed
    assert histogram_quantile(0.95, {0.1: 5, 0.25: 9}) is None  # no +Inf bucket
    assert histogram_quantile(0.95, {}) is None


def series(points, **labels) -> MatrixSeries:
    return MatrixSeries(metric=labels, values=[(t, str(v)) for t, v in points])


def test_analysis_from_raw_samples():
    start = 1000.0
    counted = [
        series([(990, 100), (1010, 300)], revision="v1", outcome="stop"),  # +200
        series([(990, 1), (1010, 3)], revision="v1", outcome="error"),  # +2
        series([(1005, 18), (1015, 36)], revision="v2", outcome="stop"),  # born: 36
        series([(1005, 4), (1015, 4)], revision="v2", outcome="error"),  # born: 4
        series([(1005, 50), (1015, 90)], revision="v2", outcome="rejected"),  # not admitted
        series([(1005, 7), (1015, 9)], revision="v0", outcome="error"),  # another revision
    ]
    latency = [
        series([(990, 0), (1010, 0)], revision="v1", le="0.1"),
        series([(990, 0), (1010, 202)], revision="v1", le="0.25"),
        series([(990, 0), (1010, 202)], revision="v1", le="+Inf"),
        series([(1005, 0)], revision="v2", le="0.1"),
        series([(1005, 40)], revision="v2", le="0.25"),
        series([(1005, 40)], revision="v2", le="+Inf"),
    ]
    result = analysis_from(counted, latency, "v1", "v2", start)
    assert result.window_start == start and result.canary_requests == 40
    assert result.canary_error_ratio == pytest.approx(4 / 40)
    assert result.stable_error_ratio == pytest.approx(2 / 202)
    assert result.canary_p95_seconds == pytest.approx(0.1 + 0.15 * 0.95)
    assert result.stable_p95_seconds == pytest.approx(0.1 + 0.15 * 0.95)


def test_analysis_without_canary_traffic():
    result = analysis_from([], [], "v1", "v2", 1000.0)
    assert (result.canary_requests, result.canary_error_ratio, result.stable_error_ratio) == (0, 0.0, 0.0)
    assert result.canary_p95_seconds is None and result.stable_p95_seconds is None
