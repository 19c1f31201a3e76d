"""`kubectl expertmesh status|promote|abort MODEL [-n NS]`: the `kubectl-expertmesh` plugin.

kubectl runs any executable named kubectl-expertmesh on PATH as `kubectl expertmesh`. promote
and abort only set the annotation the rollout state machine reads (crd.ROLLOUT_ANNOTATION);
the operator acts on it in its next round and removes it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pydantic import ValidationError

from expertmesh_operator.crd import ROLLOUT_ANNOTATION, ModelResourceStatus
from expertmesh_operator.extra import missing_extra_message
from expertmesh_operator.kube import KubeError, KubernetesApi, KubernetesClient


class PluginError(Exception):
    """Said to the user as `error: ...`, exit code 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubectl expertmesh", description="Inspect and steer expertmesh Models.")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("status", "revisions, traffic, rollout phase, pool replicas and conditions"),
        ("promote", "send the canary to 100%% now, skipping the remaining steps and analysis"),
        ("abort", "stop the canary and return all traffic to the stable revision"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("model", metavar="MODEL")
        c.add_argument(
            "-n", "--namespace", help="the Model's namespace (default: the context's, else 'default')"
        )
        c.add_argument("--kubeconfig", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        c.add_argument("--context", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name != "status":
            c.add_argument(
                "--wait", type=float, default=0.0, metavar="SECONDS",
                help="wait up to SECONDS for the operator to act on it",
            )  # fmt: skip
    return p.parse_args(argv)


def context_namespace(kubeconfig: str | None, context: str | None) -> str:
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _status(obj: dict[str, Any]) -> ModelResourceStatus | None:
    raw = obj.get("status")
    if not raw:
        return None
    try:
        return ModelResourceStatus.model_validate(raw)
    except ValidationError as e:
        raise PluginError(
            f"the Model's status is not one this plugin reads ({e.error_count()} problems)"
        ) from None


def _get(api: KubernetesApi, namespace: str, name: str) -> dict[str, Any]:
    obj = api.get_model(namespace, name)
    if obj is None:
        raise PluginError(
            f'Model "{name}" not found in namespace "{namespace}" (kubectl get models -A lists them)'
        )
    return obj


def render_status(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    status = _status(obj)
    lines = [f"Model:      {meta.get('namespace', 'default')}/{meta['name']}"]
    if status is None:
        lines.append("Status:     none yet (is the expertmesh operator running and watching this namespace?)")
        return "\n".join(lines) + "\n"
    lines.append(f"Generation: {meta.get('generation')} (observed {status.observed_generation})")
    rollout = status.rollout
    if rollout is not None:
        phase = rollout.phase
        if rollout.phase == "Progressing" and rollout.canary is not None:
            steps = rollout.canary.spec.rollout.canary.steps
            phase += f" (canary {rollout.canary.name}, step {rollout.step_index + 1}/{len(steps)})"
        lines.append(f"Phase:      {phase}")
        if rollout.message:
            lines.append(f"Message:    {rollout.message}")
    lines.append(f"Ready:      {status.ready}")
    if status.endpoint:
        lines.append(f"Endpoint:   {status.endpoint}")
    stable = rollout.stable.name if rollout and rollout.stable else None
    canary = rollout.canary.name if rollout and rollout.canary and rollout.phase == "Progressing" else None
    lines.append("Revisions:")
    for r in status.revisions:
        role = " (stable)" if r.name == stable else " (canary)" if r.name == canary else ""
        lines.append(f"  {r.name:<24} {r.traffic:>3}%{role}")
    if not status.revisions:
        lines.append("  none serving")
    lines.append(f"Pools ({status.replicas} replicas):")
    width = max((len(p) for p in status.replicas_per_pool), default=0)
    for pool, n in sorted(status.replicas_per_pool.items()):
        held = (
            " (held: no fresh metrics)"
            if status.autoscaling and pool in status.autoscaling.held_pools
            else ""
        )
        lines.append(f"  {pool:<{width}}  {n}{held}")
    lines.append("Conditions:")
    for c in status.conditions:
        lines.append(f"  {c.type:<14} {c.status:<7} {c.reason:<22} {c.message}".rstrip())
    return "\n".join(lines) + "\n"


def request(api: KubernetesApi, namespace: str, name: str, command: str, wait_s: float = 0.0) -> str:
    """Set the rollout annotation; with wait_s, until the operator consumed it."""
    status = _status(_get(api, namespace, name))
    rollout = status.rollout if status else None
    if rollout is None or rollout.phase != "Progressing" or rollout.canary is None:
        phase = rollout.phase if rollout else "not reconciled yet"
        raise PluginError(
            f"Model {namespace}/{name} has no canary in progress (phase: {phase}); "
            "a change to spec.version or spec.source starts one"
        )
    api.set_model_annotation(namespace, name, ROLLOUT_ANNOTATION, command)
    canary, stable = rollout.canary.name, rollout.stable.name if rollout.stable else "?"
    what = f"canary {canary} to 100%" if command == "promote" else f"all traffic back to {stable}"
    if wait_s <= 0:
        return f"{command} requested for {namespace}/{name}: the operator moves {what} in its next round\n"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        obj = _get(api, namespace, name)
        if ROLLOUT_ANNOTATION not in (obj["metadata"].get("annotations") or {}):
            new = _status(obj)
            phase = new.rollout.phase if new and new.rollout else "?"
            return f"{command} done for {namespace}/{name}: phase {phase}, traffic {new.traffic if new else '?'}\n"
        time.sleep(0.5)
    raise PluginError(f"{command} was requested, but the operator did not act on it within {wait_s:.0f}s")


def main(argv: list[str] | None = None, api: KubernetesApi | None = None) -> int:
    args = parse_args(argv)
    missing = missing_extra_message("kubectl-expertmesh", ("kubernetes",)) if api is None else None
    if missing:
        print(missing, file=sys.stderr)
        return 2
    try:
        namespace = args.namespace or context_namespace(args.kubeconfig, args.context)
        if api is None:
            api = KubernetesClient.from_kubeconfig(args.kubeconfig, args.context)
        if args.command == "status":
            sys.stdout.write(render_status(_get(api, namespace, args.model)))
        else:
            sys.stdout.write(request(api, namespace, args.model, args.command, args.wait))
    except (PluginError, KubeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
