"""Per-layer expert dispatch round trip: our ZeroMQ data path against a plain Ray DeploymentHandle call.

One Ray Serve replica (its own process, as in a real pool) serves both paths: a
deployment method for the handle, and the ExpertGroupServer it starts for ours.
Both carry the same [rows, hidden] fp32 tensor (plus its routing weights), run the
same expert computation (one small expert, so the transport dominates), and bring
the [rows, hidden] result back. Prints the p50 / p90 of each, then
`ratio dispatch/handle` (below 1: ours is faster).

    .venv/bin/python bench/dispatch.py [--rows 64] [--hidden 1024] [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch
from ray import serve

from expertmesh.model.experts import ExpertBatch, ExpertPartition, ExpertWeights, apply_experts
from expertmesh.serve.expert_transport import ExpertGroupServer
from expertmesh.serve.remote_experts import RemoteExpertBackend


def one_expert(hidden: int, inter: int = 8) -> dict[int, ExpertWeights]:
    gen = torch.Generator().manual_seed(0)
    return {
        0: ExpertWeights(
            torch.randn(1, hidden, 2 * inter, generator=gen), torch.randn(1, inter, hidden, generator=gen)
        )
    }


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class BenchExpertGroup:
    """An expert-group replica: the work behind a Serve method, and behind a ZeroMQ endpoint."""

    def __init__(self, hidden: int):
        torch.set_num_threads(1)
        self.weights = one_expert(hidden)
        self.server = ExpertGroupServer(self.weights)

    def endpoint(self) -> str:
        return self.server.endpoint

    def run(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return apply_experts(self.weights[0], ExpertBatch(hidden, weights, [hidden.shape[0]]))


def percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[8]


def time_calls(call, calls: int) -> list[float]:
    for _ in range(10):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hidden = torch.randn(args.rows, args.hidden)
    weights = torch.rand(args.rows)
    batch = ExpertBatch(hidden, weights, [args.rows])
    expected = apply_experts(one_expert(args.hidden)[0], batch)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 18000})
        handle = serve.run(BenchExpertGroup.bind(args.hidden), name="dispatch-bench", route_prefix=None)
        assert torch.allclose(handle.run.remote(hidden, weights).result(), expected)
        theirs = time_calls(lambda: handle.run.remote(hidden, weights).result(), args.calls)
        backend = RemoteExpertBackend(ExpertPartition(1, 1), {0: [handle.endpoint.remote().result()]})
        assert torch.allclose(backend.run(0, batch), expected)
        ours = time_calls(lambda: backend.run(0, batch), args.calls)
        backend.close()
        serve.shutdown()
    finally:
        ray.shutdown()

    (ours_p50, ours_p90), (theirs_p50, theirs_p90) = percentiles(ours), percentiles(theirs)
    print(f"tensor [{args.rows}, {args.hidden}] float32 round trip over loopback, {args.calls} calls")
    print(f"zeromq data path:   p50 {ours_p50:.3f} ms   p90 {ours_p90:.3f} ms")
    print(f"DeploymentHandle:   p50 {theirs_p50:.3f} ms   p90 {theirs_p90:.3f} ms")
    print(f"ratio dispatch/handle = {ours_p50 / theirs_p50:.2f}")


if __name__ == "__main__":
    main()
