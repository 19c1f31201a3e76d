"""Serving overhead and expert-parallel cost, measured in one run on one machine.

Workload: the `small` pangu_pro_moe checkpoint (MoGE, 8 groups), 16 prompts of random
tokens (64 random ids decoded to text, and that text's ids: 65-76 tokens), 32 new tokens
each, greedy, EOS ignored, all requests at once.

Paired rounds: this shared 2-core machine drifts by 20-30 % over tens of seconds, so two
blocks timed a minute apart compare the machine, not the paths. Every path runs the
workload once untimed (warm-up); then each of PAIRED_ROUNDS rounds times the in-process
engine once and right after it each served path once, and a ratio is the median over
rounds of path/in-process. The in-process engine in the rounds runs beside Ray's idle
processes (about 0.1 of the 2 cores); its rate before Ray starts is printed too.

- `served/in-process`: the workload as KServe ModelInfer calls over gRPC (grpcio
  stubs from the KServe proto) through Ray Serve's proxy (proxy -> router -> engine), against
  the in-process `LLM` engine. Both return each request's text when it ends.
- `served-stream/in-process`: the same over `expertmesh.v1.Generation` streaming
  Generate, one message per token to each client: on 2 shared cores each message
  costs the proxy, router and client CPU that the engine then lacks.
- `served-http/in-process`: the same over the OpenAI HTTP API (non-streaming).
- `disaggregated/colocated`: served with one Serve pool per expert group
  (ZeroMQ data path; its engine on one thread, the platform's default, as it waits on its
  pools) against served with experts inside the engine (two threads), both over HTTP:
  (disaggregated/in-process) / (served-http/in-process), each from its own paired rounds
  (each model is deployed alone, so they cannot share a round).
- `moge-group-imbalance`: max/mean of the rows each expert group received over
  the in-process run (MoGE makes it exactly 1).
- `pool-replica-imbalance`: disaggregated with 2 replicas per expert pool, under
  a steady load (8 clients over HTTP, each sending its next request when the last
  one ends): the rows the engine sent each replica over a 20 s window, read from
  the platform's own `expertmesh_expert_replica_rows` counters on Ray's metrics
  port; max/mean over a pool's replicas, the worst pool. It runs on a Ray of its
  own that reports metrics every second; the throughput runs above use Ray's
  defaults (every 10 s), as `expertmesh serve` does.
- guidellm (when `make bench-peers` has installed it in .peers/guidellm): a
  bounded run of a real serving-benchmark client against the colocated model's
  OpenAI HTTP endpoint, synthetic prompts of the same sizes, the checkpoint's
  tokenizer; its throughput / TTFT / ITL summary lines are printed.

    .venv/bin/python bench/serving.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import ray
import torch
from ray import serve

from expertmesh import LLM, SamplingParams
from expertmesh.config import ServeConfig
from expertmesh.engine.config import EngineConfig
from expertmesh.model.checkpoint_maker import make_checkpoint
from expertmesh.model.experts import ColocatedExpertBackend, ExpertBatch, ExpertPartition
from expertmesh.model.loader import load_config
from expertmesh.model.tokenizer_files import load_tokenizer
from expertmesh.serve.app import deploy, grpc_options
from expertmesh.serve.metrics import (
    REPLICA_IMBALANCE,
    REPLICA_ROWS,
    counter_deltas,
    imbalance,
    metrics_endpoints,
)

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "pangu_pro_moe-small"
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 16, 64, 32
TIMED_RUNS = 3  # the in-process rate before Ray starts: the median of these runs
PAIRED_ROUNDS = 7  # rounds of in-process then each served path; the median ratio counts
# pool-replica-imbalance: replicas per expert pool, closed-loop clients, seconds before and of the window
POOL_REPLICAS, POOL_CLIENTS, POOL_WARMUP_S, POOL_WINDOW_S = 2, 8, 5.0, 20.0
GUIDELLM = ROOT / ".peers" / "guidellm" / "bin" / "guidellm"


class CountingBackend(ColocatedExpertBackend):
    """The colocated backend, also counting rows per expert group (for the imbalance figure)."""

    def __init__(self, inner: ColocatedExpertBackend, partition: ExpertPartition):
        super().__init__(inner.layers)
        self.partition = partition
        self.rows_per_group = [0] * partition.num_groups

    def run(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        for group in range(self.partition.num_groups):
            self.rows_per_group[group] += batch.for_group(self.partition, group).num_rows
        return super().run(layer, batch)


# Every round sends the same prompts again: with the prefix cache, later rounds would prefill
# almost nothing, and this measures the serving paths, not caching (bench/prefix_cache.py does).
NO_PREFIX_CACHE = {"enable_prefix_caching": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessEngine:
    """The in-process `LLM` with the engine settings the served model gets (the serving defaults,
    not the offline API's), counting rows per expert group; warmed up on the workload."""

    def __init__(self, prompts: list[list[int]]):
        settings = EngineConfig(**NO_PREFIX_CACHE).model_dump()
        self.llm = LLM(CHECKPOINT, "float32", show_progress=False, **settings)
        model = self.llm.engine.model
        moe = model.config.moe
        self.counting = CountingBackend(
            model.moe_blocks[0].backend, ExpertPartition(moe.num_experts, moe.num_routing_groups)
        )
        model.set_expert_backend(self.counting)
        self.prompts = prompts
        self.params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        self.llm.generate(prompts, self.params, use_tqdm=False)  # warm-up, as for the served paths
        self.counting.rows_per_group = [0] * len(self.counting.rows_per_group)

    def rate(self, runs: int = 1) -> float:
        """Output tokens/s of the workload: the median of `runs` timed runs."""
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            outs = self.llm.generate(self.prompts, self.params, use_tqdm=False)
            rates.append(sum(o.num_output_tokens for o in outs) / (time.perf_counter() - start))
        return statistics.median(rates)

    def group_imbalance(self) -> float:
        """max/mean of the rows each expert group received over the timed runs."""
        rows = self.counting.rows_per_group
        return max(rows) / (sum(rows) / len(rows))


def paired_rounds(baseline: InProcessEngine, paths: dict) -> dict[str, list[float]]:
    """Each path's warm-up (`path(runs=0, warm=True)`), then PAIRED_ROUNDS rounds of: the in-process
    engine once, each path once right after it. Returns {"in-process" | path name: [rate per round]}."""
    for path in paths.values():
        path(runs=0, warm=True)
    table: dict[str, list[float]] = {"in-process": [], **{name: [] for name in paths}}
    for _ in range(PAIRED_ROUNDS):
        table["in-process"].append(baseline.rate())
        for name, path in paths.items():
            table[name].append(path(runs=1, warm=False))
    return table


def paired_ratio(table: dict[str, list[float]], name: str) -> float:
    """The median over rounds of path/in-process, each round's pair timed back to back."""
    return statistics.median(p / b for p, b in zip(table[name], table["in-process"], strict=True))


def print_rounds(table: dict[str, list[float]]) -> None:
    """Each path's rate per round (output tokens/s) and, for a served path, its median ratio."""
    print(f"paired rounds, output tokens/s per round ({PAIRED_ROUNDS} rounds):")
    for name, rates in table.items():
        ratio = (
            "" if name == "in-process" else f"  median ratio to in-process {paired_ratio(table, name):.2f}"
        )
        print(f"  {name:28s} {' '.join(f'{r:6.1f}' for r in rates)}{ratio}")


async def warm_then_time(one, items: list, runs: int, warm: bool) -> float:
    """Output tokens/s of `one(item)` (it returns the tokens it got) for every item at once:
    the median of `runs` runs, after a warm-up run of the same workload, untimed, when `warm`
    (nan when `runs` is 0: the warm-up alone)."""
    if warm:
        await asyncio.gather(*(one(item) for item in items))
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(item) for item in items)))
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates) if rates else float("nan")


async def run_served_grpc(target: str, model: str, prompts: list[list[int]], **timing) -> float:
    import grpc

    from expertmesh.api.pb import generation_pb2 as gen
    from expertmesh.api.pb import generation_pb2_grpc as gen_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        sampling = gen.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

        async def one(prompt: list[int]) -> int:
            request = gen.GenerateRequest(model=model, token_ids=gen.TokenIds(ids=prompt), sampling=sampling)
            tokens = 0
            async for message in stub.Generate(request):
                if message.HasField("delta"):
                    tokens += len(message.delta.token_ids)
            return tokens

        return await warm_then_time(one, prompts, **timing)


async def run_served_infer(target: str, model: str, texts: list[str], **timing) -> float:
    """The workload as KServe ModelInfer calls (unary: the whole text at the end), through
    stubs generated from the KServe proto (tritonclient registers the same proto names, so
    it cannot share a process with the server's; the test suite calls with it separately)."""
    import grpc

    from expertmesh.api.pb import grpc_predict_v2_pb2 as oip
    from expertmesh.api.pb import grpc_predict_v2_pb2_grpc as oip_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        async def one(text: str) -> int:
            request = oip.ModelInferRequest(model_name=model)
            request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
                text.encode()
            )
            request.parameters["max_tokens"].int64_param = NEW_TOKENS
            request.parameters["temperature"].double_param = 0.0
            request.parameters["ignore_eos"].bool_param = True
            response = await stub.ModelInfer(request)
            return response.parameters["completion_tokens"].int64_param

        return await warm_then_time(one, texts, **timing)


async def run_served(base_url: str, model: str, prompts: list[list[int]], **timing) -> float:
    import openai

    body = dict(max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    # closed inside this event loop: each paired round runs its own
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600
    ) as client:

        async def one(prompt: list[int]) -> int:
            reply = await client.completions.create(model=model, prompt=prompt, **body)
            return reply.usage.completion_tokens

        return await warm_then_time(one, prompts, **timing)


def scrape(series_name: str, model: str) -> dict[str, dict[str, float]]:
    """pool -> label value -> sample, for one expertmesh series of `model`, from Ray's metrics port(s).

    Ray exports with a `ray_` prefix; the label value is the endpoint for REPLICA_ROWS, "" otherwise.
    """
    from prometheus_client.parser import text_string_to_metric_families

    name = f"ray_{series_name}"
    out: dict[str, dict[str, float]] = {}
    for url in metrics_endpoints():
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.removesuffix("_total") == name and sample.labels.get("model") == model:
                    pool = out.setdefault(sample.labels["pool"], {})
                    pool[sample.labels.get("endpoint", "")] = sample.value
    return out


async def run_steady_pool_load(base_url: str, model: str, prompts: list[list[int]]) -> tuple[dict, float]:
    """Closed-loop load; returns ({pool: {endpoint: rows sent in the window}}, output tokens/s in it)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    body = dict(max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    await client.completions.create(model=model, prompt=prompts[0][:8], max_tokens=2)  # warm-up
    stop, tokens = asyncio.Event(), [0]

    async def client_loop(i: int) -> None:
        while not stop.is_set():
            reply = await client.completions.create(model=model, prompt=prompts[i % len(prompts)], **body)
            tokens[0] += reply.usage.completion_tokens
            i += POOL_CLIENTS

    tasks = [asyncio.create_task(client_loop(i)) for i in range(POOL_CLIENTS)]
    await asyncio.sleep(POOL_WARMUP_S)
    # The counters reach the port ~2 s late (engine flush 1 s + Ray report 1 s), equally at both ends.
    before, tokens_before, start = (
        await asyncio.to_thread(scrape, REPLICA_ROWS.name, model),
        tokens[0],
        time.perf_counter(),
    )
    await asyncio.sleep(POOL_WINDOW_S)
    after, tokens_after, end = (
        await asyncio.to_thread(scrape, REPLICA_ROWS.name, model),
        tokens[0],
        time.perf_counter(),
    )
    stop.set()
    await asyncio.gather(*tasks)
    rows = {pool: counter_deltas(now, before.get(pool, {})) for pool, now in after.items()}
    return rows, (tokens_after - tokens_before) / (end - start)


def guidellm_tokenizer(out_dir: str) -> Path:
    """The checkpoint's tokenizer as transformers' AutoTokenizer reads it: the checkpoint itself
    when it has a tokenizer.json; a Pangu SentencePiece tokenizer.model (whose PanguTokenizer class
    lives in the release's remote code) converted to a tokenizer.json, as our loader converts it."""
    if (CHECKPOINT / "tokenizer.json").is_file():
        return CHECKPOINT
    target = Path(out_dir) / "tokenizer"
    target.mkdir()
    load_tokenizer(CHECKPOINT).save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return target


def guidellm_command(base_url: str, model: str, out_dir: str) -> list[str]:
    """guidellm 0.8 `run`: one stream, then NUM_PROMPTS streams (the workload's concurrency), each
    bounded to NUM_PROMPTS requests and 60 s; synthetic prompts of the workload's sizes, counted
    with the checkpoint's own tokenizer (no hub access); results as JSON."""
    return [
        str(GUIDELLM),
        "run",
        f"--backend=kind=openai_http,target={base_url},model={model},request_format=/v1/completions",
        "--profile=kind=concurrent",
        "--override", "profile.streams", f"1,{NUM_PROMPTS}",
        f"--constraint=kind=max_requests,count={NUM_PROMPTS}",
        "--constraint=kind=max_duration,seconds=60",
        f"--tokenizer=kind=huggingface_auto,model={guidellm_tokenizer(out_dir)}",
        f"--data=kind=synthetic_text,prompt_tokens={PROMPT_LEN},output_tokens={NEW_TOKENS}",
        f"--output=kind=json,path={out_dir}/benchmarks.json",
        "--disable-console",
    ]  # fmt: skip


def guidellm_summary(report: dict) -> list[str]:
    """One line per guidellm benchmark: output throughput, TTFT and ITL (median, p95), request counts."""
    lines = []
    for bench in report["benchmarks"]:
        strategy, m = bench["config"]["strategy"], bench["metrics"]
        ok = {key: m[key]["successful"] for key in ("time_to_first_token_ms", "inter_token_latency_ms")}
        ttft, itl = ok["time_to_first_token_ms"], ok["inter_token_latency_ms"]
        totals = m["request_totals"]
        lines.append(
            f"guidellm {strategy['type_']}@{strategy.get('streams', '')}: "
            f"{m['output_tokens_per_second']['total']['mean']:6.1f} output tokens/s, "
            f"{m['requests_per_second']['total']['mean']:.2f} req/s; "
            f"TTFT median {ttft['median']:.0f} ms p95 {ttft['percentiles']['p95']:.0f} ms; "
            f"ITL median {itl['median']:.1f} ms p95 {itl['percentiles']['p95']:.1f} ms; "
            f"{totals['successful']} ok, {totals['errored']} errored, {totals['incomplete']} incomplete"
        )
    return lines


def run_guidellm(base_url: str, model: str) -> None:
    """A bounded guidellm run against the OpenAI HTTP endpoint; prints its summary lines."""
    if not GUIDELLM.is_file():
        print("guidellm: skipped (not installed; `make bench-peers` installs it in .peers/guidellm)")
        return
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="guidellm-") as out_dir:
        command = guidellm_command(base_url, model, out_dir)
        print("guidellm:", shlex.join(command).replace(str(ROOT) + "/", ""))
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(f"guidellm: failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
            return
        version = subprocess.run([str(GUIDELLM), "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{version}, against the colocated model's OpenAI HTTP endpoint:")
        report = json.loads((Path(out_dir) / "benchmarks.json").read_text())
        for line in guidellm_summary(report):
            print(f"  {line}")


def workload_prompts() -> tuple[list[str], list[list[int]]]:
    """Random-token prompts as text and as the token ids that text encodes to, so the text
    API (ModelInfer) and the token-id paths run the same workload (about PROMPT_LEN tokens each)."""
    tokenizer = load_tokenizer(CHECKPOINT)
    gen = torch.Generator().manual_seed(0)
    sampled = torch.randint(3, 16000, (NUM_PROMPTS, PROMPT_LEN), generator=gen).tolist()
    texts = [tokenizer.decode(ids) for ids in sampled]
    return texts, [tokenizer.encode(t).ids for t in texts]  # as the engine encodes a text prompt


@contextlib.contextmanager
def local_serve(metrics_report_interval_ms: int | None = None):
    """A fresh local Ray (never another session's cluster on this machine) with Serve's HTTP and
    gRPC proxies on free ports; yields (HTTP base URL, gRPC target)."""
    port, grpc_port = free_port(), free_port()
    system_config = (
        {"metrics_report_interval_ms": metrics_report_interval_ms} if metrics_report_interval_ms else {}
    )
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=free_port(),  # as `expertmesh serve`; pool-replica-imbalance reads it
        _system_config=system_config,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=grpc_options(grpc_port))
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        serve.shutdown()
    finally:
        ray.shutdown()


def main() -> None:
    torch.set_num_threads(2)
    if not (CHECKPOINT / "config.json").is_file():
        make_checkpoint("pangu_pro_moe", "small", CHECKPOINT)
    texts, prompts = workload_prompts()
    print(
        f"workload: {NUM_PROMPTS} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{NEW_TOKENS} new tokens, greedy; {CHECKPOINT.name}"
    )

    baseline = InProcessEngine(prompts)
    print(f"in-process engine, before Ray: {baseline.rate(TIMED_RUNS):8.1f} output tokens/s")

    revision = {
        "source": str(CHECKPOINT),
        "dtype": "float32",
        "engine_threads": 2,  # as in-process
        "engine": NO_PREFIX_CACHE,
    }
    # The disaggregated engine keeps the platform's default of one thread (as
    # deployments/serve/disaggregated.yaml deploys it): it waits on its pools for every MoE layer,
    # and a second engine thread only takes the 2 cores from the 8 pool processes.
    disaggregated_revision = revision | {"engine_threads": 1, "expert_parallel": {"enabled": True}}
    # Throughput runs under Ray's defaults, as `expertmesh serve` starts it.
    with local_serve() as (url, grpc_target):
        # Each model is measured alone: idle deployments cost CPU too (Serve's controller
        # reconciles every deployment 10 times a second), which the measured model would lack.
        deploy(ServeConfig.parse({"models": [{"name": "colocated", "revisions": [revision]}]}))
        colocated_paths = {
            "served gRPC ModelInfer": lambda **t: asyncio.run(
                run_served_infer(grpc_target, "colocated", texts, **t)
            ),
            "served gRPC stream": lambda **t: asyncio.run(
                run_served_grpc(grpc_target, "colocated", prompts, **t)
            ),
            "served HTTP": lambda **t: asyncio.run(run_served(url, "colocated", prompts, **t)),
        }
        colocated = paired_rounds(baseline, colocated_paths)
        print_rounds(colocated)
        run_guidellm(url, "colocated")
        deploy(
            ServeConfig.parse({"models": [{"name": "disaggregated", "revisions": [disaggregated_revision]}]})
        )
        disaggregated = paired_rounds(
            baseline,
            {
                "served HTTP, 8 expert pools": lambda **t: asyncio.run(
                    run_served(url, "disaggregated", prompts, **t)
                )
            },
        )
        print_rounds(disaggregated)

    # pool-replica-imbalance reads the platform's counters: a fresh Ray that reports them every
    # second (its default is every 10 s), kept apart from the throughput runs, whose every process
    # would pay for the tenfold reporting.
    with local_serve(metrics_report_interval_ms=1000) as (url, _):
        pooled = revision | {"expert_parallel": {"enabled": True, "replicas_per_group": POOL_REPLICAS}}
        deploy(ServeConfig.parse({"models": [{"name": "pooled", "revisions": [pooled]}]}))
        pool_rows, pool_tps = asyncio.run(run_steady_pool_load(url, "pooled", prompts))
        # a replica that got nothing in the window has no series: count it as 0
        loads = {
            p: sorted(rows.values()) + [0] * (POOL_REPLICAS - len(rows)) for p, rows in pool_rows.items()
        }
        pool_imbalance = {p: imbalance(v) or float("nan") for p, v in sorted(loads.items())}
        print(
            f"served, disaggregated x{POOL_REPLICAS} replicas/pool, HTTP, {POOL_CLIENTS} closed-loop clients: "
            f"{pool_tps:5.1f} output tokens/s over a {POOL_WINDOW_S:.0f} s window"
        )
        for pool, rows in sorted(loads.items()):
            print(f"  {pool}: rows per replica {[int(r) for r in rows]}, max/mean {pool_imbalance[pool]:.3f}")
        gauges = scrape(REPLICA_IMBALANCE.name, "pooled")
        worst_gauge = max((v for g in gauges.values() for v in g.values()), default=float("nan"))
        print(f"  platform gauge {REPLICA_IMBALANCE.name}, worst pool, last 1 s window: {worst_gauge:.3f}")
    served_http = paired_ratio(colocated, "served HTTP")
    print(f"ratio served-http/in-process = {served_http:.2f}")
    print(f"ratio served-stream/in-process = {paired_ratio(colocated, 'served gRPC stream'):.2f}")
    print(f"ratio served/in-process = {paired_ratio(colocated, 'served gRPC ModelInfer'):.2f}")
    disaggregated_ratio = paired_ratio(disaggregated, "served HTTP, 8 expert pools") / served_http
    print(f"ratio disaggregated/colocated = {disaggregated_ratio:.2f}")
    print(f"ratio moge-group-imbalance = {baseline.group_imbalance():.2f}")
    num_pools = load_config(CHECKPOINT).moe.num_routing_groups
    if len(pool_imbalance) != num_pools:
        print(f"pool-replica-imbalance: only {len(pool_imbalance)} of {num_pools} pools reported rows")
    print(f"ratio pool-replica-imbalance = {max(pool_imbalance.values(), default=float('nan')):.2f}")


if __name__ == "__main__":
    main()
