"""`expertmesh serve`: start Ray on this machine, deploy the app, say how to call it, wait."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from expertmesh.config import ExpertParallelSpec, ModelSpec, RevisionSpec, ServeConfig

METRICS_PORT = 8080


def single_model_config(
    model: Path, name: str | None, expert_parallel: int, dtype: str, api_key: str | None, http_port: int
) -> ServeConfig:
    """The config `--model PATH [--expert-parallel N]` stands for."""
    revision = RevisionSpec(
        source=str(model.resolve()),
        dtype=dtype,
        expert_parallel=ExpertParallelSpec(
            enabled=expert_parallel > 0, replicas_per_group=max(1, expert_parallel)
        ),
    )
    return ServeConfig(
        models=[ModelSpec(name=name or model.name.lower(), revisions=[revision])],
        api_key=api_key,
        http_port=http_port,
    )


def usage_text(config: ServeConfig, host: str) -> str:
    model = config.models[0].name
    base = f"http://{host}:{config.http_port}"
    auth = ' -H "Authorization: Bearer $EXPERTMESH_API_KEY"' if config.api_key else ""
    key = "os.environ['EXPERTMESH_API_KEY']" if config.api_key else '"unused"'
    return f"""
expertmesh is serving {", ".join(m.name for m in config.models)}
  OpenAI HTTP   {base}/v1
  health        {base}/health
  gRPC          {host}:{config.grpc_port}   (KServe OIP v2 inference.GRPCInferenceService, expertmesh.v1.Generation; reflection on)
  metrics       http://{host}:{METRICS_PORT}/metrics   (Prometheus: deployments/prometheus/prometheus.yml)

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


def serve_forever(config: ServeConfig, host: str = "127.0.0.1") -> None:
    import ray
    from ray import serve

    from expertmesh.kernels import native_kernels
    from expertmesh.serve.app import deploy, grpc_options

    # Compile the native kernels here, once, before any replica needs them: a replica that
    # compiles them itself (about 40 s on 2 cores) and then loads its weights outlasted Serve's
    # 60 s wait for the app on a first start.
    print("preparing the native CPU kernels (compiled once for this machine, then cached)...", flush=True)
    native_kernels()
    # a fixed metrics port, so deployments/prometheus/prometheus.yml can scrape it
    ray.init(include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT)
    try:
        serve.start(
            http_options={"host": host, "port": config.http_port}, grpc_options=grpc_options(config.grpc_port)
        )
        print(f"deploying {len(config.models)} model(s); the first start loads the weights...", flush=True)
        deploy(config)
        print(usage_text(config, host), flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    finally:
        print("shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
