"""`expertmesh-operator`: the operator, in a cluster (the Helm chart's Deployment) or outside one.

expertmesh-operator --namespace models --prometheus-url http://prometheus:9090 --interval 30
expertmesh-operator --all-namespaces --kubeconfig ~/.kube/config --once   # one round, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from expertmesh_operator.extra import missing_extra_message
from expertmesh_operator.kube import KubeError, KubernetesClient
from expertmesh_operator.operator_settings import OperatorSettings, default_ray_cluster_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="expertmesh-operator",
        description="Turns expertmesh Models into one KubeRay RayService, autoscales its pools and rolls out revisions.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch Models in NS (repeatable; default: $POD_NAMESPACE, else 'default')",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch Models in every namespace")
    p.add_argument(
        "--rayservice", default="expertmesh", help="the RayService to manage (default: %(default)s)"
    )
    p.add_argument(
        "--rayservice-namespace",
        help="where the RayService lives (default: $POD_NAMESPACE, else the first --namespace, else 'default')",
    )
    p.add_argument(
        "--ray-cluster-config",
        type=Path,
        help="YAML file with the rayClusterConfig to create the RayService with, if it does not exist",
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("EXPERTMESH_PROMETHEUS_URL"),
        help="Prometheus HTTP API for autoscaling and canary analysis (default: $EXPERTMESH_PROMETHEUS_URL; "
        "without one, replicas follow the spec and canaries advance only by promote)",
    )
    p.add_argument(
        "--prometheus-timeout", type=float, default=5.0, help="seconds per query (default: %(default)s)"
    )
    p.add_argument(
        "--interval", type=float, default=30.0, help="seconds between rounds (default: %(default)s)"
    )
    p.add_argument(
        "--endpoint", help="the serving endpoint written to status (default: the RayService's Serve service)"
    )
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)"
    )
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--once", action="store_true", help="run one reconcile round and exit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    pod_ns = os.environ.get("POD_NAMESPACE")
    namespaces = None if args.all_namespaces else tuple(args.namespaces or [pod_ns or "default"])
    rs_ns = args.rayservice_namespace or pod_ns or (namespaces[0] if namespaces else "default")
    cluster: dict[str, Any] = default_ray_cluster_config()
    if args.ray_cluster_config is not None:
        try:
            cluster = yaml.safe_load(args.ray_cluster_config.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"expertmesh-operator: cannot read --ray-cluster-config: {e}") from None
        if not isinstance(cluster, dict):
            raise SystemExit(f"expertmesh-operator: {args.ray_cluster_config} must hold a YAML mapping")
    return OperatorSettings(
        namespaces=namespaces,
        rayservice_name=args.rayservice,
        rayservice_namespace=rs_ns,
        ray_cluster_config=cluster,
        interval_s=args.interval,
        endpoint=args.endpoint,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_extra_message("expertmesh-operator")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    try:
        client = KubernetesClient.from_kubeconfig(args.kubeconfig, args.context)
    except KubeError as e:
        print(f"expertmesh-operator: {e}", file=sys.stderr)
        return 2
    prometheus = None
    if args.prometheus_url:
        from expertmesh_operator.prometheus import PrometheusClient

        prometheus = PrometheusClient(args.prometheus_url, timeout_s=args.prometheus_timeout)

    from expertmesh_operator.handlers import Operator, operate

    operator = Operator(client, prometheus, settings)
    if args.once:
        try:
            report = operator.reconcile("once")
        except KubeError as e:
            print(f"expertmesh-operator: {e}", file=sys.stderr)
            return 1
        print(f"{len(report.writes)} write(s), {len(report.errors)} error(s)")
        return 1 if report.errors else 0
    where = "all namespaces" if settings.namespaces is None else ", ".join(settings.namespaces)
    logging.getLogger(__name__).info(
        "watching Models in %s; RayService %s/%s; Prometheus %s; every %.0fs",
        where, settings.rayservice_namespace, settings.rayservice_name,
        args.prometheus_url or "(none)", settings.interval_s,
    )  # fmt: skip
    asyncio.run(operate(operator, client.api_client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
