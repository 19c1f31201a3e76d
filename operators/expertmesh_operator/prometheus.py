"""What the operator asks Prometheus: each pool's load, and a canary's health against stable.

A thin synchronous client over the HTTP API (`GET /api/v1/query`). The PromQL comes from
small pure functions (`*_query`), and the answers are turned into `PoolMetrics` /
`AnalysisResult` by pure functions too, so both are unit-tested without a server. The kopf
handlers call `pool_metrics` and `canary_analysis` through `asyncio.to_thread`; apart from
HTTP they have no side effects.

Series (platform/expertmesh/serve/metrics.py, as the scrape config stores them) and signals:

| signal | pool "engine" | pool "experts-gN" |
|---|---|---|
| queue depth | `expertmesh_queue_depth` | none exported |
| ongoing requests | running + waiting: `expertmesh_batch_size` + `expertmesh_queue_depth` | none exported |
| tokens/s | prompt + generated tokens the engines processed | token rows the group took, per MoE layer |
| TPOT p95 | the revision's time per output token p95, for every pool on its decode path | same |

Tokens/s has one unit for both kinds of pool, tokens through the pool per second: a MoGE
group takes exactly one row per token and layer, so its rate equals the engine's; a hot
top-k group takes more (the engine's figure needs both of its token counters, which the
first request creates). A signal a pool does not export is None, and the autoscaler uses
the others. Whether a pool reports at all, and how old its data is, comes from
`expertmesh_replica_up` (each live replica sets it): no such sample, or any failed query,
gives `PoolMetrics.error`; `sampled_at` is its oldest sample's own timestamp, which the
autoscaler compares with `metricsMaxAgeSeconds`. Either way it holds, never scales down.

Canary analysis counts what happened in [window_start, now] from raw counter samples
(`expertmesh_requests_total` by outcome, the TPOT histogram's buckets) instead of
`increase()`: a canary's counters are born inside the window, already above zero at their
first scrape, and `increase()` would drop that first value, and with it early errors.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expertmesh.serve_layout import (
    BATCH_SIZE_METRIC,
    ENGINE_POOL,
    ERROR_OUTCOME,
    GENERATION_TOKENS_METRIC,
    GROUP_TOKENS_METRIC,
    NOT_ADMITTED_OUTCOME,
    PROMPT_TOKENS_METRIC,
    QUEUE_DEPTH_METRIC,
    REPLICA_UP_METRIC,
    REQUESTS_METRIC,
    TPOT_METRIC,
)
from expertmesh_operator.pool_autoscale import PoolMetrics
from expertmesh_operator.rollout import AnalysisResult

# The series as Prometheus stores them: counters gain "_total", histograms "_bucket".
ENGINE_TOKENS = (f"{PROMPT_TOKENS_METRIC}_total", f"{GENERATION_TOKENS_METRIC}_total")
GROUP_TOKENS = f"{GROUP_TOKENS_METRIC}_total"
TPOT_BUCKETS = f"{TPOT_METRIC}_bucket"
REQUESTS = f"{REQUESTS_METRIC}_total"
QUANTILE = 0.95

logger = logging.getLogger(__name__)

_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")


class PrometheusError(Exception):
    """Prometheus could not be asked, or did not answer a query; the message says which and why."""


# ---- the API's answers --------------------------------------------------------------------------


class VectorSample(BaseModel):
    """One series of an instant vector: its labels and (evaluation time, value)."""

    model_config = ConfigDict(frozen=True)

    metric: dict[str, str]
    value: tuple[float, str]

    @property
    def number(self) -> float:
        return float(self.value[1])  # Prometheus writes NaN and +Inf as "NaN", "+Inf"


class MatrixSeries(BaseModel):
    """One series of a range vector: its labels and raw samples (their own timestamps)."""

    model_config = ConfigDict(frozen=True)

    metric: dict[str, str]
    values: list[tuple[float, str]]

    @property
    def points(self) -> list[tuple[float, float]]:
        return [(t, float(v)) for t, v in self.values]


class QueryData(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    result_type: Literal["vector", "matrix", "scalar", "string"] = Field(alias="resultType")
    result: list[VectorSample] | list[MatrixSeries] | tuple[float, str]


class QueryResponse(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    status: Literal["success", "error"]
    data: QueryData | None = None
    error_type: str | None = Field(None, alias="errorType")
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)


def parse_response(status_code: int, body: str | bytes, promql: str) -> QueryData:
    """The data of a /api/v1/query answer, or PrometheusError saying what was wrong with it."""
    try:
        reply = QueryResponse.model_validate_json(body)
    except ValidationError as e:
        if status_code >= 400:
            raise PrometheusError(f"HTTP {status_code} for {promql!r}: {_snippet(body)}") from None
        raise PrometheusError(
            f"unreadable answer to {promql!r} ({e.error_count()} problems): {_snippet(body)}"
        ) from None
    if reply.status != "success" or reply.data is None:
        raise PrometheusError(
            f"query {promql!r} failed (HTTP {status_code}): {reply.error_type}: {reply.error}"
        )
    return reply.data


def _snippet(body: str | bytes, limit: int = 200) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---- PromQL, as pure functions ------------------------------------------------------------------


def _string(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _any_of(values: Iterable[str]) -> str:
    """A regex matching exactly these values (PromQL anchors label regexes), as a string literal."""
    return _string("|".join(_REGEX_SPECIAL.sub(r"\\\1", v) for v in values))


def duration(seconds: float) -> str:
    """A PromQL duration, in whole milliseconds (at least 1ms)."""
    return f"{max(1, round(seconds * 1000))}ms"


def pool_selector(model: str, revision: str, pools: Sequence[str]) -> str:
    return f"model={_string(model)},revision={_string(revision)},pool=~{_any_of(sorted(pools))}"


def freshness_query(model: str, revision: str, pools: Sequence[str]) -> str:
    """Per pool, the timestamp of its oldest `expertmesh_replica_up` sample (absent: not reporting)."""
    return f"min by (pool) (timestamp({REPLICA_UP_METRIC}{{{pool_selector(model, revision, pools)}}}))"


def queue_depth_query(model: str, revision: str, pools: Sequence[str]) -> str:
    return f"sum by (pool) ({QUEUE_DEPTH_METRIC}{{{pool_selector(model, revision, pools)}}})"


def ongoing_requests_query(model: str, revision: str, pools: Sequence[str]) -> str:
    """Requests in the engines: those decoding (batch) plus those waiting to join it."""
    names = _any_of([BATCH_SIZE_METRIC, QUEUE_DEPTH_METRIC])
    return f"sum by (pool) ({{__name__=~{names},{pool_selector(model, revision, pools)}}})"


def tokens_per_second_query(model: str, revision: str, pools: Sequence[str], window_s: float) -> str:
    """Tokens through each pool per second: engines' prompt + generated tokens; a group's rows per layer.

    (rate() drops the metric name, so the two engine counters are summed apart, not by one
    `__name__` regex: their rates would share a label set.)
    """
    sel, w = pool_selector(model, revision, pools), duration(window_s)
    prompt, generated = (f"sum by (pool) (rate({name}{{{sel}}}[{w}]))" for name in ENGINE_TOKENS)
    groups = f"avg by (pool) (sum by (pool, layer) (rate({GROUP_TOKENS}{{{sel}}}[{w}])))"
    return f"({prompt} + {generated}) or {groups}"


def tpot_p95_query(model: str, revision: str, window_s: float, quantile: float = QUANTILE) -> str:
    """The revision's time-per-output-token quantile over the window, from the histogram's buckets."""
    sel = f"model={_string(model)},revision={_string(revision)}"
    return (
        f"histogram_quantile({quantile}, sum by (le) (rate({TPOT_BUCKETS}{{{sel}}}[{duration(window_s)}])))"
    )


def requests_range_query(model: str, revisions: Sequence[str], range_s: float) -> str:
    """Raw samples of the admitted-request counters of these revisions' engines, by outcome."""
    sel = f"model={_string(model)},revision=~{_any_of(sorted(revisions))},pool={_string(ENGINE_POOL)}"
    return f"{REQUESTS}{{{sel},outcome!={_string(NOT_ADMITTED_OUTCOME)}}}[{duration(range_s)}]"


def latency_range_query(model: str, revisions: Sequence[str], range_s: float) -> str:
    """Raw samples of the TPOT histogram's buckets of these revisions."""
    sel = f"model={_string(model)},revision=~{_any_of(sorted(revisions))}"
    return f"{TPOT_BUCKETS}{{{sel}}}[{duration(range_s)}]"


# ---- answers -> signals, as pure functions ------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def by_label(samples: Sequence[VectorSample], label: str) -> dict[str, float]:
    return {s.metric.get(label, ""): s.number for s in samples}


def assemble_pool_metrics(
    pools: Sequence[str],
    freshness: Mapping[str, float],
    queue_depth: Mapping[str, float],
    ongoing: Mapping[str, float],
    tokens_per_second: Mapping[str, float],
    tpot_p95: float | None,
    now: float,
    what: str = "",
) -> dict[str, PoolMetrics]:
    """One PoolMetrics per pool; a pool without a freshness sample is an error (the autoscaler holds)."""
    out: dict[str, PoolMetrics] = {}
    for pool in pools:
        if pool not in freshness or not math.isfinite(freshness[pool]):
            out[pool] = PoolMetrics(
                sampled_at=now,
                error=(
                    f"no {REPLICA_UP_METRIC} sample for pool {pool}{what} in Prometheus: "
                    "its replicas are not scraped, or their series went stale"
                ),
            )
            continue
        out[pool] = PoolMetrics(
            sampled_at=freshness[pool],
            queue_depth=_finite(queue_depth[pool]) if pool in queue_depth else None,
            ongoing_requests=_finite(ongoing[pool]) if pool in ongoing else None,
            tokens_per_second=_finite(tokens_per_second[pool]) if pool in tokens_per_second else None,
            tpot_p95_seconds=None if tpot_p95 is None else _finite(tpot_p95),
        )
    return out


def failed_pool_metrics(pools: Sequence[str], now: float, error: str) -> dict[str, PoolMetrics]:
    return {pool: PoolMetrics(sampled_at=now, error=error) for pool in pools}


def counter_increase(points: Sequence[tuple[float, float]], since: float) -> float:
    """What a counter gained after `since`, from its raw (timestamp, value) samples.

    The baseline is the last sample at or before `since`; a series with none was born after
    it and counts from zero. A drop is a reset (the process restarted): the new value counts.
    No extrapolation, unlike PromQL's increase().
    """
    ordered = sorted(points)
    before = [v for t, v in ordered if t <= since]
    previous = before[-1] if before else 0.0
    gained = 0.0
    for t, v in ordered:
        if t <= since:
            continue
        gained += v - previous if v >= previous else v
        previous = v
    return gained


def histogram_quantile(quantile: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}.

    Linear interpolation inside the bucket holding the rank (from 0 for the first bucket);
    a rank in the +Inf bucket answers the highest finite bound. None when nothing was observed.
    """
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None  # a histogram without its +Inf bucket is incomplete
    counts = [buckets[b] for b in bounds]
    counts = [max(counts[: i + 1]) for i in range(len(counts))]  # monotonic, as Prometheus enforces
    total = counts[-1]
    if total <= 0:
        return None
    rank = quantile * total
    index = next(i for i, c in enumerate(counts) if c >= rank)
    if index == len(bounds) - 1:
        return bounds[-2] if len(bounds) > 1 else None
    lower, below = (0.0, 0.0) if index == 0 else (bounds[index - 1], counts[index - 1])
    upper, inside = bounds[index], counts[index] - below
    if inside <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / inside


def analysis_from(
    requests_series: Sequence[MatrixSeries],
    latency_series: Sequence[MatrixSeries],
    stable: str,
    canary: str,
    window_start: float,
    quantile: float = QUANTILE,
) -> AnalysisResult:
    """Canary vs stable over the window, from the raw samples of the two range queries."""
    admitted = {stable: 0.0, canary: 0.0}
    errors = {stable: 0.0, canary: 0.0}
    for series in requests_series:
        revision = series.metric.get("revision")
        if revision not in admitted or series.metric.get("outcome") == NOT_ADMITTED_OUTCOME:
            continue
        gained = counter_increase(series.points, window_start)
        admitted[revision] += gained
        if series.metric.get("outcome") == ERROR_OUTCOME:
            errors[revision] += gained
    buckets: dict[str, dict[float, float]] = {stable: {}, canary: {}}
    for series in latency_series:
        revision, le = series.metric.get("revision"), series.metric.get("le")
        if revision not in buckets or le is None:
            continue
        bound = float(le)
        buckets[revision][bound] = buckets[revision].get(bound, 0.0) + counter_increase(
            series.points, window_start
        )

    def ratio(revision: str) -> float:
        return errors[revision] / admitted[revision] if admitted[revision] > 0 else 0.0

    return AnalysisResult(
        window_start=window_start,
        canary_requests=round(admitted[canary]),
        canary_error_ratio=ratio(canary),
        stable_error_ratio=ratio(stable),
        canary_p95_seconds=histogram_quantile(quantile, buckets[canary]),
        stable_p95_seconds=histogram_quantile(quantile, buckets[stable]),
    )


# ---- the client ---------------------------------------------------------------------------------


class PrometheusClient:
    """Queries one Prometheus server. `rate_window_s` is the rate() window of the pool signals:
    make it at least four scrape intervals. `lookback_s` is how far before a canary window's
    start to look for each counter's baseline sample (Prometheus' own lookback is 5 minutes)."""

    def __init__(
        self, url: str, timeout_s: float = 5.0, rate_window_s: float = 60.0, lookback_s: float = 300.0
    ):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.rate_window_s = rate_window_s
        self.lookback_s = lookback_s

    def query(self, promql: str, at: float | None = None) -> QueryData:
        """GET /api/v1/query; PrometheusError on any failure (connection, HTTP, JSON, query)."""
        params: dict[str, str] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            reply = requests.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {e}") from None
        return parse_response(reply.status_code, reply.content, promql)

    def vector(self, promql: str, at: float | None = None) -> list[VectorSample]:
        data = self.query(promql, at)
        if data.result_type != "vector":
            raise PrometheusError(f"expected an instant vector from {promql!r}, got a {data.result_type}")
        return list(data.result)  # type: ignore[arg-type]

    def matrix(self, promql: str, at: float | None = None) -> list[MatrixSeries]:
        data = self.query(promql, at)
        if data.result_type != "matrix":
            raise PrometheusError(f"expected a range vector from {promql!r}, got a {data.result_type}")
        return list(data.result)  # type: ignore[arg-type]

    def pool_metrics(
        self, model: str, revision: str, pools: Sequence[str], now: float
    ) -> dict[str, PoolMetrics]:
        """The autoscaling signals of each pool of model@revision at `now`; failures set `error`.

        `model` is the served name and `pools` are the metrics' `pool` labels ("engine",
        "experts-g0", ...), not Serve deployment names. Queries are evaluated at `now`.
        """
        if not pools:
            return {}
        w = self.rate_window_s
        try:
            freshness = by_label(self.vector(freshness_query(model, revision, pools), now), "pool")
            queue = by_label(self.vector(queue_depth_query(model, revision, pools), now), "pool")
            ongoing = by_label(self.vector(ongoing_requests_query(model, revision, pools), now), "pool")
            tokens = by_label(self.vector(tokens_per_second_query(model, revision, pools, w), now), "pool")
            tpot = [s.number for s in self.vector(tpot_p95_query(model, revision, w), now)]
        except PrometheusError as e:
            return failed_pool_metrics(pools, now, str(e))
        return assemble_pool_metrics(
            pools,
            freshness,
            queue,
            ongoing,
            tokens,
            tpot[0] if tpot else None,
            now,
            f" of {model}@{revision}",
        )

    def canary_analysis(
        self, model: str, stable: str, canary: str, window_start: float, now: float
    ) -> AnalysisResult | None:
        """Error ratios and p95 TPOT of canary vs stable over [window_start, now]; None when
        Prometheus fails (the rollout then waits: no step, no rollback)."""
        span = max(now - window_start, 0.0) + self.lookback_s
        revisions = [stable, canary]
        try:
            counted = self.matrix(requests_range_query(model, revisions, span), now)
            latency = self.matrix(latency_range_query(model, revisions, span), now)
        except PrometheusError as e:
            logger.warning("canary analysis of %s (%s vs %s) skipped: %s", model, canary, stable, e)
            return None
        return analysis_from(counted, latency, stable, canary, window_start)
