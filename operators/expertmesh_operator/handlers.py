"""kopf handlers: every Model event, and a periodic tick, run the same `reconcile_once`.

One RayService holds every Model, so each handler reconciles ALL Models rather than the one
that changed; `Operator` serialises those rounds with a lock (kopf runs the handlers of
different Models concurrently, in threads). The tick is operator-wide, not a per-Model
kopf timer: N Models would otherwise run N whole-world rounds per interval.

Deletion: our own finalizer (crd.FINALIZER, managed by reconcile_once) keeps a deleted Model
until its deployments are out of serveConfigV2, so the kopf delete handler is `optional`
(kopf adds no finalizer of its own). kopf keeps its bookkeeping in annotations, not in
status, which the CRD's structural schema would prune; it runs standalone (no peering CRD).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Collection
from typing import Any

import kopf

from expertmesh_operator.crd import GROUP, PLURAL, VERSION
from expertmesh_operator.kube import KubeError, KubernetesApi
from expertmesh_operator.reconcile_round import LoopReport, MetricsSource, OperatorSettings, reconcile_once

logger = logging.getLogger(__name__)
KOPF_PREFIX = "kopf.serving.expertmesh.io"
RETRY_DELAY_S = 5.0


class Operator:
    """reconcile_once, one round at a time, with the world it talks to."""

    def __init__(
        self,
        api: KubernetesApi,
        prometheus: MetricsSource | None,
        settings: OperatorSettings,
        clock: Any = time.time,
    ):
        self.api, self.prometheus, self.settings, self.clock = api, prometheus, settings, clock
        self._lock = threading.Lock()
        self.rounds = 0

    def reconcile(self, why: str) -> LoopReport:
        with self._lock:
            report = reconcile_once(self.api, self.prometheus, self.settings, self.clock())
            self.rounds += 1
        for write in report.writes:
            logger.info("%s: %s", why, write)
        for error in report.errors:
            logger.warning("%s: %s", why, error)
        return report

    async def tick_forever(self) -> None:
        """Every interval: Prometheus-driven autoscaling and canary steps happen here."""
        while True:
            try:
                await asyncio.to_thread(self.reconcile, "periodic")
            except KubeError as e:  # a failed round is retried next interval, never the end of the loop
                logger.error("periodic reconcile failed, retrying in %.0fs: %s", self.settings.interval_s, e)
            except Exception:
                logger.exception("periodic reconcile failed; retrying in %.0fs", self.settings.interval_s)
            await asyncio.sleep(self.settings.interval_s)


def connection_info(api_client: Any) -> kopf.ConnectionInfo:
    """kopf's credentials, from the same client configuration the operator's own calls use."""
    config = api_client.configuration
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


def build_registry(operator: Operator, api_client: Any) -> kopf.OperatorRegistry:
    """A fresh registry (no module-level decorators), so tests can run several operators."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX)
        settings.posting.level = logging.WARNING  # our own Events say what was decided
        # No runtime observation of namespaces and CRDs: the namespaces are exact names (or
        # cluster-wide) and the chart installs the Model CRD before the operator, so kopf needs
        # neither, and the chart's RBAC grants neither (cluster-scoped reads a namespaced
        # operator has no business with). Left on, kopf tries anyway and, refused, retries for
        # ~1 minute before it watches a single Model (tests/e2e proves it against RBAC).
        settings.scanning.disabled = True

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(api_client)

    def on_model(name: str, namespace: str, reason: str, **_: Any) -> None:
        try:
            report = operator.reconcile(f"{reason} {namespace}/{name}")
        except KubeError as e:
            raise kopf.TemporaryError(str(e), delay=RETRY_DELAY_S) from None
        if report.errors:
            raise kopf.TemporaryError("; ".join(report.errors), delay=RETRY_DELAY_S)

    resource = (GROUP, VERSION, PLURAL)
    kopf.on.create(*resource, registry=registry, id="reconcile-create")(on_model)
    kopf.on.update(*resource, registry=registry, id="reconcile-update")(on_model)
    kopf.on.resume(*resource, registry=registry, id="reconcile-resume")(on_model)
    kopf.on.delete(*resource, registry=registry, id="reconcile-delete", optional=True)(on_model)
    return registry


async def operate(
    operator: Operator,
    api_client: Any,
    *,
    stop_flag: Any = None,
    ready_flag: Any = None,
    namespaces: Collection[str] | None = None,
) -> None:
    """kopf and the periodic tick, until `stop_flag` is set (or a signal stops kopf)."""
    if namespaces is None:
        namespaces = operator.settings.namespaces
    # created before kopf starts, so kopf leaves it alone; cancelled when kopf returns
    ticker = asyncio.create_task(operator.tick_forever(), name="expertmesh-tick")
    try:
        await kopf.operator(
            registry=build_registry(operator, api_client),
            standalone=True,
            clusterwide=namespaces is None,
            namespaces=list(namespaces or ()),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
