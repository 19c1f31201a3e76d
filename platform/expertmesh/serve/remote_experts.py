"""Expert backend that runs each group on a replica of that group's pool.

For every MoE layer of a step, every group's rows go out at once, each to the
replica of its pool with the least outstanding work; the layer waits for all
of them. A replica that errs or does not answer in time is marked down, and
its rows are resent to another replica of the pool; a down replica is tried
again after a cool-down, so a pool recovers by itself.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field

import torch
import zmq

from expertmesh.errors import BackendUnavailableError
from expertmesh.model.experts import ExpertBatch, ExpertPartition
from expertmesh.serve.expert_transport import ExpertRequestHeader, frame_tensor, tensor_frame


class ExpertPoolUnavailableError(BackendUnavailableError):
    """No replica of an expert group's pool answered."""


def pick_replica(
    outstanding: list[int],
    down_until: list[float],
    now: float,
    exclude: set[int],
    sent: list[int] | None = None,
) -> int | None:
    """Least outstanding work among replicas that are up (pure): the replica index, or None.

    Ties (common: an engine waits for each layer's replies before sending the next) go to the
    replica that has been sent the fewest rows so far, so a pool's replicas share the load.
    """
    candidates = [i for i in range(len(outstanding)) if down_until[i] <= now and i not in exclude]
    sent = sent or [0] * len(outstanding)
    return min(candidates, key=lambda i: (outstanding[i], sent[i], i)) if candidates else None


@dataclass
class _Replica:
    endpoint: str
    socket: zmq.Socket
    outstanding: int = 0  # rows sent and not yet answered
    down_until: float = 0.0
    failures: int = 0  # in a row; each one doubles the cool-down, an answer resets it


@dataclass
class _InFlight:
    group: int
    replica: int
    rows: int
    payload: list
    tried: set[int] = field(default_factory=set)
    deadline: float = 0.0


class RemoteExpertBackend:
    def __init__(
        self,
        partition: ExpertPartition,
        pools: dict[int, list[str]],
        timeout_s: float = 5.0,
        cooldown_s: float = 2.0,
    ):
        missing = set(range(partition.num_groups)) - set(pools)
        if missing or any(not pools[g] for g in pools):
            raise ValueError(
                f"every expert group needs at least one replica endpoint; none for {sorted(missing)}"
            )
        self.partition, self.timeout_s, self.cooldown_s = partition, timeout_s, cooldown_s
        self._context = zmq.Context.instance()
        self._pools = {
            g: [_Replica(ep, self._connect(ep)) for ep in endpoints] for g, endpoints in pools.items()
        }
        self._ids = itertools.count()
        self.rows_sent_per_replica: dict[str, int] = {ep: 0 for eps in pools.values() for ep in eps}
        self._pending: dict[int, list[str]] | None = None
        self._pending_lock = threading.Lock()

    def update_endpoints(self, pools: dict[int, list[str]]) -> None:
        """New replica endpoints (Serve scaled or replaced replicas); applied before the next layer runs.

        Thread-safe: the Serve replica's event loop calls it, the engine thread applies it.
        """
        with self._pending_lock:
            self._pending = {g: list(eps) for g, eps in pools.items() if eps}

    def _apply_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        for group, endpoints in (pending or {}).items():
            if group not in self._pools:
                continue
            kept = {r.endpoint: r for r in self._pools[group]}
            for endpoint, replica in kept.items():
                if endpoint not in endpoints:
                    replica.socket.close(linger=0)
            self._pools[group] = [kept.get(ep) or _Replica(ep, self._connect(ep)) for ep in endpoints]
            for ep in endpoints:
                self.rows_sent_per_replica.setdefault(ep, 0)

    def _connect(self, endpoint: str) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def _reset(self, replica: _Replica) -> None:
        # drop whatever zmq still queues for a replica that stopped answering
        replica.socket.close(linger=0)
        replica.socket = self._connect(replica.endpoint)
        replica.outstanding = 0

    def _send(self, request: _InFlight, now: float) -> None:
        pool = self._pools[request.group]
        choice = pick_replica(
            [r.outstanding for r in pool],
            [r.down_until for r in pool],
            now,
            request.tried,
            [self.rows_sent_per_replica[r.endpoint] for r in pool],
        )
        if choice is None:
            raise ExpertPoolUnavailableError(
                f"expert group {request.group}: none of its {len(pool)} replicas answered "
                f"({', '.join(r.endpoint for r in pool)})"
            )
        replica = pool[choice]
        request.replica, request.deadline = choice, now + self.timeout_s
        request.tried.add(choice)
        replica.outstanding += request.rows
        self.rows_sent_per_replica[replica.endpoint] += request.rows
        replica.socket.send_multipart(request.payload, copy=False)

    def run(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        if self._pending is not None:
            self._apply_pending()
        hidden_size = batch.hidden.shape[1]
        dtype = str(batch.hidden.dtype).removeprefix("torch.")
        in_flight: dict[int, _InFlight] = {}
        results: dict[int, torch.Tensor] = {}
        now = time.monotonic()
        for group in range(self.partition.num_groups):
            part = batch.for_group(self.partition, group)
            if part.num_rows == 0:
                results[group] = batch.hidden.new_empty(0, hidden_size)
                continue
            request_id = next(self._ids)
            header = ExpertRequestHeader(request_id, layer, part.counts, hidden_size, dtype)
            payload = [
                header.encode(),
                tensor_frame(part.hidden),
                tensor_frame(part.weights.to(part.hidden.dtype)),
            ]
            in_flight[request_id] = _InFlight(group, -1, part.num_rows, payload)
            self._send(in_flight[request_id], now)
        self._collect(in_flight, results, batch.hidden.dtype, hidden_size)
        return torch.cat([results[g] for g in range(self.partition.num_groups)])

    def _collect(self, in_flight, results, dtype, hidden_size) -> None:
        poller = zmq.Poller()
        for pool in self._pools.values():
            for replica in pool:
                poller.register(replica.socket, zmq.POLLIN)
        while in_flight:
            wait_ms = max(0.0, min(r.deadline for r in in_flight.values()) - time.monotonic()) * 1000
            ready = dict(poller.poll(timeout=wait_ms))
            for sock in ready:
                header_raw, body = sock.recv_multipart(copy=False)
                header = json.loads(header_raw.bytes)
                request = in_flight.get(header["request_id"])
                if request is None:
                    continue  # a late answer to a request already resent elsewhere
                replica = self._pools[request.group][request.replica]
                replica.outstanding = max(0, replica.outstanding - request.rows)
                if header["ok"]:
                    replica.failures = 0
                    results[request.group] = frame_tensor(body, dtype, (request.rows, hidden_size)).clone()
                    del in_flight[header["request_id"]]
                else:
                    self._fail_over(request, poller)
            now = time.monotonic()
            for request in [r for r in in_flight.values() if r.deadline <= now]:
                self._fail_over(request, poller)

    def _fail_over(self, request: _InFlight, poller: zmq.Poller) -> None:
        replica = self._pools[request.group][request.replica]
        replica.failures += 1
        # a replica that keeps failing (dead, not slow) is retried ever more rarely, up to a minute
        replica.down_until = time.monotonic() + min(60.0, self.cooldown_s * 2 ** (replica.failures - 1))
        poller.unregister(replica.socket)
        self._reset(replica)
        poller.register(replica.socket, zmq.POLLIN)
        self._send(request, time.monotonic())

    def endpoints(self) -> dict[int, list[str]]:
        """Each group's replica endpoints now (for metrics; safe from another thread)."""
        return {group: [r.endpoint for r in pool] for group, pool in list(self._pools.items())}

    def close(self) -> None:
        for pool in self._pools.values():
            for replica in pool:
                replica.socket.close(linger=0)
