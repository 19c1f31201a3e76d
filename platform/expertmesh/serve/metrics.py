"""`expertmesh_*` metrics, exported through Ray Serve's metrics API.

Every series carries `model`, `revision` and `pool` labels. `pool` is "engine" for
what an Engine replica measures about itself, and "experts-gN" for expert group N
(its token load, its replicas). Ray exports them on each node's metrics export port
(`ray start --metrics-export-port`, `ray.init(_metrics_export_port=...)`) with a
`ray_` prefix; the Prometheus scrape config in deployments/prometheus/ strips it, so
Prometheus stores the names listed in SERIES.

Hot path: after each step the engine thread adds a few integers and one list
reference per MoE layer to a `StepWindow` (plain Python, one short lock; ~3 us for
48 layers). A flusher thread swaps the window out once per `interval_s`, turns it
into samples (`window_samples`, a pure function) and hands them to Ray, so neither
the sums nor Ray's metric calls land on a step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.sequence import RequestOutput
from expertmesh.errors import InvalidRequestError
from expertmesh.kernels.guard import DECODE, PREFILL, Choice
from expertmesh.model.experts import ExpertPartition
from expertmesh.serve_layout import (
    BATCH_SIZE_METRIC,
    ENGINE_POOL,
    GENERATION_TOKENS_METRIC,
    GROUP_TOKENS_METRIC,
    PROMPT_TOKENS_METRIC,
    QUEUE_DEPTH_METRIC,
    REPLICA_UP_METRIC,
    REQUESTS_METRIC,
    TPOT_METRIC,
    TTFT_METRIC,
    expert_pool,
)

logger = logging.getLogger(__name__)

OUTCOMES = ("stop", "length", "abort", "error", "rejected")

# Seconds. TTFT spans a queue wait and a prefill; TPOT one decode step. Ray exports a histogram's
# _sum from bucket midpoints, so means (sum/count) are approximate; quantiles use the buckets.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Series:
    name: str  # as Prometheus stores it (counters gain "_total", histograms _bucket/_sum/_count)
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()  # beyond model, revision, pool
    buckets: tuple[float, ...] = ()

    @property
    def stored_names(self) -> tuple[str, ...]:
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.name}_{s}" for s in ("bucket", "sum", "count"))
        return (self.name,)


REQUESTS = Series(
    REQUESTS_METRIC,
    "counter",
    "Requests ended, by outcome: stop, length (finished), abort (client left), error, rejected (invalid or queue full)",
    ("outcome",),
)
TTFT = Series(
    TTFT_METRIC,
    "histogram",
    "Seconds from the engine accepting a request to its first token",
    buckets=TTFT_BUCKETS,
)
TPOT = Series(
    TPOT_METRIC,
    "histogram",
    "Seconds per output token after the first, per request",
    buckets=TPOT_BUCKETS,
)
PROMPT_TOKENS = Series(PROMPT_TOKENS_METRIC, "counter", "Prompt tokens prefilled")
GENERATION_TOKENS = Series(GENERATION_TOKENS_METRIC, "counter", "Tokens generated")
BATCH_SIZE = Series(BATCH_SIZE_METRIC, "gauge", "Sequences in the running batch")
QUEUE_DEPTH = Series(QUEUE_DEPTH_METRIC, "gauge", "Requests waiting to join the batch")
KV_CACHE_USAGE = Series("expertmesh_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use")
PREFIX_CACHE_QUERIES = Series(
    "expertmesh_prefix_cache_queries",
    "counter",
    "Prompt tokens of admitted requests looked up in the prefix cache",
)
PREFIX_CACHE_HITS = Series(
    "expertmesh_prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache (not prefilled)"
)
PREFIX_CACHE_BLOCKS = Series(
    "expertmesh_prefix_cache_blocks", "gauge", "KV cache blocks holding cached content, in use or idle"
)
SPEC_PROPOSED = Series(
    "expertmesh_spec_decode_proposed_tokens",
    "counter",
    "Tokens speculative decoding proposed for verification",
)
SPEC_ACCEPTED = Series(
    "expertmesh_spec_decode_accepted_tokens", "counter", "Proposed tokens the model verified and kept"
)
GROUP_TOKENS = Series(
    GROUP_TOKENS_METRIC,
    "counter",
    "Token rows routed to an expert group (pool), per MoE layer",
    ("layer",),
)
EXPERT_TOKENS = Series(
    "expertmesh_expert_tokens",
    "counter",
    # no layer label: experts x layers is 3072 series for Pangu Pro MoE 72B, per replica
    "Token rows routed to an expert, summed over MoE layers; pool is the expert's group",
    ("expert",),
)
GROUP_IMBALANCE = Series(
    "expertmesh_expert_group_imbalance",
    "gauge",
    "Max/mean token rows over expert groups in the last flush window, per MoE layer (1.0 = balanced)",
    ("layer",),
)
REPLICA_ROWS = Series(
    "expertmesh_expert_replica_rows",
    "counter",
    "Token rows an Engine sent to one replica of an expert pool",
    ("endpoint",),
)
REPLICA_IMBALANCE = Series(
    "expertmesh_pool_replica_imbalance",
    "gauge",
    "Max/mean token rows over the replicas of an expert pool in the last flush window (1.0 = balanced)",
)
REPLICA_UP = Series(
    REPLICA_UP_METRIC,
    "gauge",
    "1 for each live replica of a pool; sum by (model, revision, pool) is the pool's replica count",
)
MODEL_INFO = Series(
    "expertmesh_model_info",
    "gauge",
    "1 per Engine replica, describing the model: routing (moge|topk|dense), expert groups, mode",
    ("routing", "groups", "mode"),
)

KERNEL_PATH = Series(
    "expertmesh_kernel_path",
    "gauge",
    "1 per replica, guarded native op and size class (decode|prefill): the path the load-time guard chose "
    "(native|torch), so a CPU where torch's kernel won is visible",
    ("op", "size", "path"),
)

SERIES: tuple[Series, ...] = (
    REQUESTS,
    TTFT,
    TPOT,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    BATCH_SIZE,
    QUEUE_DEPTH,
    KV_CACHE_USAGE,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_BLOCKS,
    SPEC_PROPOSED,
    SPEC_ACCEPTED,
    GROUP_TOKENS,
    EXPERT_TOKENS,
    GROUP_IMBALANCE,
    REPLICA_ROWS,
    REPLICA_IMBALANCE,
    REPLICA_UP,
    MODEL_INFO,
    KERNEL_PATH,
)


def stored_series_names() -> set[str]:
    """Every metric name Prometheus can hold for expertmesh (for checking rules and dashboards)."""
    return {name for s in SERIES for name in s.stored_names}


# ---- pure aggregation ---------------------------------------------------------------


def imbalance(loads: Sequence[float]) -> float | None:
    """max/mean of the loads: 1.0 is perfect balance, len(loads) is all on one. None when all are 0."""
    if not loads:
        return None
    total = sum(loads)
    if total <= 0:
        return None
    return max(loads) * len(loads) / total


def group_loads(expert_counts: Sequence[int], partition: ExpertPartition) -> list[int]:
    """Rows per expert -> rows per expert group (groups are contiguous ranges of experts)."""
    size = partition.experts_per_group
    return [sum(expert_counts[g * size : (g + 1) * size]) for g in range(partition.num_groups)]


def counter_deltas(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What each monotonic count gained since `before`; a key new in `now` counts from 0."""
    return {key: value - before.get(key, 0) for key, value in now.items()}


def request_timings(output: RequestOutput) -> tuple[float | None, float | None]:
    """(time to first token, time per output token after the first); None where not measurable."""
    first = output.first_token_time
    if first is None:
        return None, None
    ttft = max(0.0, first - output.arrival_time)
    n = output.num_output_tokens
    if output.finished_time is None or n < 2:
        return ttft, None
    return ttft, max(0.0, output.finished_time - first) / (n - 1)


def outcome_of(output: RequestOutput | None) -> str:
    """How a stream that ended without an exception ended: its finish reason, else abort."""
    if output is not None and output.finished:
        reason = output.outputs[0].finish_reason
        return reason if reason in OUTCOMES else "stop"
    return "abort"  # the stream stopped before a finished output: the client left or was cancelled


@dataclass
class FinishedRequest:
    outcome: str
    ttft: float | None = None
    tpot: float | None = None

    @classmethod
    def of(cls, output: RequestOutput | None, outcome: str) -> FinishedRequest:
        ttft, tpot = request_timings(output) if output is not None else (None, None)
        return cls(outcome, ttft, tpot)


async def track_request(
    stream: AsyncIterator[RequestOutput], on_finished: Callable[[RequestOutput | None, str], None]
) -> AsyncIterator[RequestOutput]:
    """Pass a request's outputs through; when the stream ends, call on_finished(last output, outcome)."""
    last: RequestOutput | None = None
    outcome = "abort"  # stays so if the consumer stops early (GeneratorExit, cancellation)
    try:
        # aclosing: an early stop closes the engine's stream at once, which aborts its request
        async with contextlib.aclosing(stream):
            async for out in stream:
                last = out
                yield out
        outcome = outcome_of(last)
    except InvalidRequestError:
        outcome = "rejected"
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        on_finished(last, outcome)


def expert_rows(model_or_blocks) -> list[tuple[int, list[int]]]:
    """(layer, rows per expert) of every MoE block of a CausalLM (or of its moe_blocks) in its latest forward."""
    blocks = getattr(model_or_blocks, "moe_blocks", model_or_blocks)
    return [(block.layer, block.last_expert_counts) for block in blocks]


@dataclass
class StepWindow:
    """What the engine did since the last flush: cheap to add to per step, summed at flush."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # MoE layer -> each step's rows-per-expert list. Kept by reference (the model makes a new
    # list every forward pass), so a step costs an append per layer; the flusher sums them.
    layer_steps: dict[int, list[Sequence[int]]] = field(default_factory=dict)

    def add_step(
        self, prompt_tokens: int, generated: int, expert_rows: Iterable[tuple[int, Sequence[int]]]
    ) -> None:
        self.steps += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generated
        for layer, counts in expert_rows:
            if counts:
                self.layer_steps.setdefault(layer, []).append(counts)

    @property
    def layer_expert_rows(self) -> dict[int, list[int]]:
        """MoE layer -> rows per expert, summed over the window's steps."""
        return {
            layer: [sum(col) for col in zip(*steps, strict=True)] for layer, steps in self.layer_steps.items()
        }


@dataclass(frozen=True)
class EngineState:
    running: int
    waiting: int
    kv_cache_usage: float
    prefix_cache: dict | None = None  # LLMEngine.prefix_cache_stats(), when the cache is on
    speculative: dict | None = None  # LLMEngine.speculative_stats(), when speculation is on

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineState:
        # Lock-free reads of lengths from another thread: a value one step old is fine for a gauge.
        # Idle cached blocks count as free: any request may take them.
        alloc = engine.allocator
        used = 1.0 - alloc.num_free / alloc.num_blocks if alloc.num_blocks else 0.0
        cache, spec = engine.prefix_cache_stats(), engine.speculative_stats()
        return cls(
            len(engine.scheduler.running),
            len(engine.scheduler.waiting),
            used,
            cache if cache["enabled"] else None,
            spec if spec["enabled"] else None,
        )


@dataclass(frozen=True)
class Sample:
    series: Series
    value: float
    pool: str = ENGINE_POOL
    labels: tuple[tuple[str, str], ...] = ()  # the series' own labels, in order


def kernel_path_samples(choices: dict[str, Choice], pool: str = ENGINE_POOL) -> list[Sample]:
    """Pure: one KERNEL_PATH sample per guarded op and size class, labelled with its chosen path."""
    return [
        Sample(KERNEL_PATH, 1, pool, (("op", op), ("size", size), ("path", getattr(choice, size))))
        for op, choice in sorted(choices.items())
        for size in (DECODE, PREFILL)
    ]


def window_samples(
    window: StepWindow,
    finished: Sequence[FinishedRequest],
    state: EngineState,
    partition: ExpertPartition | None,
    replica_rows: dict[str, int] | None = None,
    pools: dict[int, list[str]] | None = None,
    engine_gained: dict[str, int] | None = None,
) -> list[Sample]:
    """Pure: the samples one flush records.

    Counters get only what they gained (never 0: Ray's counters refuse it); gauges are set
    every flush; imbalance gauges only when their window carried rows, so an idle engine
    keeps reporting its last measured balance.
    """
    out = [
        Sample(BATCH_SIZE, state.running),
        Sample(QUEUE_DEPTH, state.waiting),
        Sample(KV_CACHE_USAGE, state.kv_cache_usage),
    ]
    if state.prefix_cache is not None:
        out.append(Sample(PREFIX_CACHE_BLOCKS, state.prefix_cache["cached_blocks"]))
    counted = ((PREFIX_CACHE_QUERIES, "queries"), (PREFIX_CACHE_HITS, "hits"))
    counted += ((SPEC_PROPOSED, "proposed"), (SPEC_ACCEPTED, "accepted"))
    for series, key in counted:
        if engine_gained and engine_gained.get(key):
            out.append(Sample(series, engine_gained[key]))
    if window.prompt_tokens:
        out.append(Sample(PROMPT_TOKENS, window.prompt_tokens))
    if window.generation_tokens:
        out.append(Sample(GENERATION_TOKENS, window.generation_tokens))
    outcomes: dict[str, int] = {}
    for req in finished:
        outcomes[req.outcome] = outcomes.get(req.outcome, 0) + 1
        if req.ttft is not None:
            out.append(Sample(TTFT, req.ttft))
        if req.tpot is not None:
            out.append(Sample(TPOT, req.tpot))
    out += [Sample(REQUESTS, n, labels=(("outcome", o),)) for o, n in sorted(outcomes.items())]
    layer_rows = window.layer_expert_rows if partition is not None else {}
    if layer_rows:
        per_expert = [0] * partition.num_experts
        for layer, rows in sorted(layer_rows.items()):
            loads = group_loads(rows, partition)
            for group, n in enumerate(loads):
                if n:
                    out.append(Sample(GROUP_TOKENS, n, expert_pool(group), (("layer", str(layer)),)))
            ratio = imbalance(loads)
            if ratio is not None:
                out.append(Sample(GROUP_IMBALANCE, ratio, labels=(("layer", str(layer)),)))
            per_expert = [a + b for a, b in zip(per_expert, rows, strict=True)]
        size = partition.experts_per_group
        for expert, n in enumerate(per_expert):
            if n:
                out.append(Sample(EXPERT_TOKENS, n, expert_pool(expert // size), (("expert", str(expert)),)))
    if replica_rows is not None and pools is not None:
        for group, endpoints in sorted(pools.items()):
            loads = [replica_rows.get(ep, 0) for ep in endpoints]
            for endpoint, n in zip(endpoints, loads, strict=True):
                if n:
                    out.append(Sample(REPLICA_ROWS, n, expert_pool(group), (("endpoint", endpoint),)))
            ratio = imbalance(loads)
            if ratio is not None:
                out.append(Sample(REPLICA_IMBALANCE, ratio, expert_pool(group)))
    return out


# ---- the Ray side -------------------------------------------------------------------


class RaySink:
    """One Ray Serve metric object per series, with this replica's model and revision as default tags."""

    def __init__(self, model: str, revision: str, series: Iterable[Series] = SERIES):
        from ray.serve import metrics as serve_metrics  # imported here: unit tests need no Ray

        self._metrics = {}
        for s in series:
            keys = ("model", "revision", "pool", *s.labels)
            if s.kind == "counter":
                metric = serve_metrics.Counter(s.name, s.help, tag_keys=keys)
            elif s.kind == "gauge":
                metric = serve_metrics.Gauge(s.name, s.help, tag_keys=keys)
            else:
                metric = serve_metrics.Histogram(s.name, s.help, boundaries=list(s.buckets), tag_keys=keys)
            metric.set_default_tags({"model": model, "revision": revision})
            self._metrics[s.name] = metric

    def record(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            metric = self._metrics[sample.series.name]
            tags = {"pool": sample.pool, **dict(sample.labels)}
            kind = sample.series.kind
            if kind == "counter":
                metric.inc(sample.value, tags=tags)
            elif kind == "gauge":
                metric.set(sample.value, tags=tags)
            else:
                metric.observe(sample.value, tags=tags)


def metrics_endpoints() -> list[str]:
    """The Prometheus endpoint of every live node of the connected Ray cluster (`ray.init` first).

    Each node serves all its processes' metrics, expertmesh's included, on its metrics export
    port, a random one unless Ray was started with `--metrics-export-port` / `_metrics_export_port`.
    """
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"] and node.get("MetricsExportPort", 0) > 0
    ]


def mark_replica_up(model: str, revision: str, pool: str, kernel_choices: dict[str, Choice]) -> RaySink:
    """Report this process as one live replica of `pool`, and what its kernel guard chose; keep
    the returned sink alive with it."""
    sink = RaySink(model, revision, (REPLICA_UP, KERNEL_PATH))
    sink.record([Sample(REPLICA_UP, 1, pool), *kernel_path_samples(kernel_choices, pool)])
    return sink


class EngineMetrics:
    """The metrics of one Engine replica.

    - `after_step(outputs)`: the engine thread, after each step (AsyncLLMEngine's on_step).
    - `track(stream)`: wraps a request's output stream and records how it ended.
    - `watch_expert_backend(backend)`: disaggregated mode, the RemoteExpertBackend once it exists.

    A daemon thread flushes to Ray every `interval_s`.
    """

    def __init__(
        self,
        model: str,
        revision: str,
        engine: LLMEngine,
        partition: ExpertPartition | None = None,
        disaggregated: bool = False,
        interval_s: float = 1.0,
    ):
        self.engine, self.partition, self.interval_s = engine, partition, interval_s
        self._seen_step = engine.last_step
        self._moe_blocks = engine.model.moe_blocks  # fixed once loaded; saves walking the layers per step
        self._lock = threading.Lock()
        self._window = StepWindow()
        self._finished: list[FinishedRequest] = []
        self._backend = None  # RemoteExpertBackend, in disaggregated mode
        self._rows_before: dict[str, int] = {}
        self._engine_counts_before: dict[str, int] = {}
        self._sink = RaySink(model, revision)
        moe = engine.model.config.moe
        info = (
            ("routing", moe.routing if moe else "dense"),
            ("groups", str(partition.num_groups if partition else 0)),
            ("mode", "disaggregated" if disaggregated else "colocated"),
        )
        self._sink.record([Sample(REPLICA_UP, 1), Sample(MODEL_INFO, 1, labels=info)])
        self._sink.record(kernel_path_samples(engine.kernel_choices))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expertmesh-metrics", daemon=True)
        self._thread.start()

    def after_step(self, outputs: Sequence[RequestOutput]) -> None:
        step = self.engine.last_step
        if step is self._seen_step:
            return  # nothing ran (the loop calls on idle wake-ups too, or the plan was empty)
        self._seen_step = step
        rows = expert_rows(self._moe_blocks)
        with self._lock:
            # a verified span (speculative decoding) yields several tokens in one output
            generated = sum(len(out.outputs[0].delta_token_ids) for out in outputs)
            self._window.add_step(step.prefill_tokens, generated, rows)

    def on_finished(self, output: RequestOutput | None, outcome: str) -> None:
        record = FinishedRequest.of(output, outcome)
        with self._lock:
            self._finished.append(record)

    def track(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Yield the stream's outputs; when it ends, record its outcome and timings."""
        return track_request(stream, self.on_finished)

    def watch_expert_backend(self, backend) -> None:
        """Report replica load from a RemoteExpertBackend (its endpoints() and rows_sent_per_replica)."""
        self._backend = backend

    def flush(self) -> None:
        with self._lock:
            window, self._window = self._window, StepWindow()
            finished, self._finished = self._finished, []
        deltas = pools = None
        if self._backend is not None:
            pools = self._backend.endpoints()  # replicas come and go: Serve replaces and scales them
            now = dict(self._backend.rows_sent_per_replica)  # a copy: the engine thread adds to it
            deltas, self._rows_before = counter_deltas(now, self._rows_before), now
        state = EngineState.of(self.engine)
        # what the engine's own counters (prefix cache, speculation) gained since the last flush
        counts = {key: (state.prefix_cache or {}).get(key, 0) for key in ("queries", "hits")}
        counts |= {key: (state.speculative or {}).get(key, 0) for key in ("proposed", "accepted")}
        gained, self._engine_counts_before = counter_deltas(counts, self._engine_counts_before), counts
        samples = window_samples(window, finished, state, self.partition, deltas, pools, gained)
        self._sink.record(samples)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # metrics must never take the replica down
                logger.exception("expertmesh metrics flush failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
