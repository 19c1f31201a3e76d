"""`expertmesh serve`: start Ray on this machine, deploy the app, say how to call it, wait."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from expertmesh.config import MAX_THREADS, ExpertParallelSpec, ModelSpec, RevisionSpec, ServeConfig

METRICS_PORT = 8080  # deployments/prometheus/prometheus.yml scrapes it


def single_model_config(model: Path, name: str | None, expert_parallel: int, dtype: str) -> ServeConfig:
    """The config `--model PATH [--expert-parallel N]` stands for (ports and key: the flags')."""
    revision = RevisionSpec(
        source=str(model.resolve()),
        dtype=dtype,
        expert_parallel=ExpertParallelSpec(
            enabled=expert_parallel > 0, replicas_per_group=max(1, expert_parallel)
        ),
    )
    return ServeConfig(models=[ModelSpec(name=name or model.name.lower(), revisions=[revision])])


def computing_replicas(config: ServeConfig, groups_of: Callable[[RevisionSpec], int]) -> int:
    """Threads the config's replicas run on one machine: every engine replica's, and every expert
    replica's of a disaggregated revision (`groups_of` gives a revision's expert groups)."""
    total = 0
    for model in config.models:
        for rev in model.revisions:
            total += rev.engine_replicas * rev.engine_threads  # 1 where the revision chose none
            if rev.expert_parallel.enabled:
                total += groups_of(rev) * rev.expert_parallel.replicas_per_group * rev.expert_threads
    return total


def share_cores(config: ServeConfig, cpus: int, groups_of: Callable[[RevisionSpec], int]) -> ServeConfig:
    """The config with this machine's cores shared among its engines (pure).

    A revision that sets neither `engine_threads` nor an engine CPU reservation gets the cores
    divided evenly among every thread the config's replicas run, at least one: all of a 2-core
    machine for one colocated model, one thread for a disaggregated one whose 8 expert replicas
    need the cores (what measured fastest here). Torch threads beyond the cores only spin against
    each other, so nothing is oversubscribed by default.
    """
    threads = min(MAX_THREADS, max(1, cpus // max(1, computing_replicas(config, groups_of))))

    def engine_threads(rev: RevisionSpec) -> RevisionSpec:
        if "engine_threads" in rev.model_fields_set or rev.resources.engine.num_cpus > 0:
            return rev
        return rev.model_copy(update={"engine_threads": threads})

    models = [
        m.model_copy(update={"revisions": [engine_threads(r) for r in m.revisions]}) for m in config.models
    ]
    return config.model_copy(update={"models": models})


def usage_text(config: ServeConfig, host: str, metrics_port: int = METRICS_PORT) -> str:
    model = config.models[0].name
    base = f"http://{host}:{config.http_port}"
    auth = ' -H "Authorization: Bearer $EXPERTMESH_API_KEY"' if config.api_key else ""
    key = "os.environ['EXPERTMESH_API_KEY']" if config.api_key else '"unused"'
    return f"""
expertmesh is serving {", ".join(m.name for m in config.models)}
  OpenAI HTTP   {base}/v1
  health        {base}/health
  gRPC          {host}:{config.grpc_port}   (KServe OIP v2 inference.GRPCInferenceService, expertmesh.v1.Generation; reflection on)
  metrics       http://{host}:{metrics_port}/metrics   (Prometheus: deployments/prometheus/prometheus.yml)

curl:
  curl -s {base}/v1/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{model}", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}}'
  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "hello"}}], "max_tokens": 32, "stream": true}}'

python (pip install openai):
  import os, openai
  client = openai.OpenAI(base_url="{base}/v1", api_key={key})
  print(client.completions.create(model="{model}", prompt="import os", max_tokens=32).choices[0].text)

gRPC from Python (tritonclient[grpc]):
  import numpy as np, tritonclient.grpc as g
  c = g.InferenceServerClient("{host}:{config.grpc_port}")
  x = g.InferInput("text_input", [1], "BYTES"); x.set_data_from_numpy(np.array([b"def main():"], dtype=object))
  print(c.infer("{model}", [x]).as_numpy("text_output"))

stream from the command line:
  .venv/bin/expertmesh generate --url {base} --model {model} "def main():"

Ctrl-C stops it.
"""


def serve_forever(config: ServeConfig, host: str = "127.0.0.1", metrics_port: int = METRICS_PORT) -> None:
    import ray
    from ray import serve

    from expertmesh.kernels import native_kernels
    from expertmesh.serve.app import deploy, grpc_options
    from expertmesh.serve.deployments import partition_for

    config = share_cores(config, len(os.sched_getaffinity(0)), lambda rev: partition_for(rev).num_groups)
    for model in config.models:
        for rev in model.revisions:
            print(f"{model.name}/{rev.name}: {rev.engine_threads} engine thread(s) per replica", flush=True)

    # Compile the native kernels here, once, before any replica needs them: a replica that
    # compiles them itself (about 40 s on 2 cores) and then loads its weights outlasted Serve's
    # 60 s wait for the app on a first start.
    print("preparing the native CPU kernels (compiled once for this machine, then cached)...", flush=True)
    native_kernels()
    # SIGTERM stops a start-up as Ctrl-C does (through the `finally` below), not by killing the
    # process with its Ray still running
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # a Ray of its own ("local": never one that RAY_ADDRESS names, whose Serve the exit would
    # shut down), with a fixed metrics port, so deployments/prometheus/prometheus.yml can scrape it
    ray.init(address="local", include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        serve.start(
            http_options={"host": host, "port": config.http_port}, grpc_options=grpc_options(config.grpc_port)
        )
        print(f"deploying {len(config.models)} model(s); the first start loads the weights...", flush=True)
        deploy(config)
        print(usage_text(config, host, metrics_port), flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    finally:
        print("shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
