"""Expert backend that runs each group on a replica of that group's pool.

For every MoE layer of a step, every group's rows go out at once, each to the
replica of its pool with the least outstanding work; the layer waits for all
of them. A replica that errs or does not answer in time is marked down, and
its rows are resent to another replica of the pool; a down replica is tried
again after a cool-down, so a pool recovers by itself.

`submit` sends and returns at once; `wait` collects one submitted layer. Several
layers may be in flight (the two micro-batches of the ping-pong overlap): while
waiting for one, replies to the others are kept for their own `wait`, and a
replica that fails any of them is failed over.
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


def joining_balance(sent: list[int], down_until: list[float], now: float) -> int:
    """The rows-sent count a replica joining a pool starts from (pure): level with the pool's
    least-loaded replica that is up, so pick_replica shares the load from the join on; from 0,
    a newcomer would take every request until it had caught up with the pool's history."""
    return min(
        (n for n, down in zip(sent, down_until, strict=True) if down <= now), default=min(sent, default=0)
    )


@dataclass
class _Replica:
    endpoint: str
    socket: zmq.Socket
    outstanding: int = 0  # rows sent and not yet answered
    down_until: float = 0.0
    failures: int = 0  # in a row; each one doubles the cool-down, an answer resets it
    balance: int = 0  # rows sent, as pick_replica compares them (a newcomer joins level: see joining_balance)


@dataclass
class ExpertCall:
    """One submitted layer: each group's output rows, as they come back."""

    hidden_size: int
    dtype: torch.dtype
    num_groups: int
    results: dict[int, torch.Tensor] = field(default_factory=dict)
    waiting: int = 0  # groups not answered yet


@dataclass
class _InFlight:
    call: ExpertCall
    group: int
    replica: int
    rows: int
    payload: list
    tried: set[int] = field(default_factory=set)
    deadline: float = 0.0


class RemoteExpertBackend:
    concurrent = True  # the pools compute while the engine does other work between submit and wait

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
        self._in_flight: dict[int, _InFlight] = {}  # request id -> request, of every submitted call

    def update_endpoints(self, pools: dict[int, list[str]]) -> None:
        """New replica endpoints (Serve scaled or replaced replicas); applied once nothing is in flight.

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
            stay = [r for r in self._pools[group] if r.endpoint in endpoints]
            level = joining_balance([r.balance for r in stay], [r.down_until for r in stay], time.monotonic())
            self._pools[group] = [
                kept.get(ep) or _Replica(ep, self._connect(ep), balance=level) for ep in endpoints
            ]
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
            [r.balance for r in pool],
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
        replica.balance += request.rows
        self.rows_sent_per_replica[replica.endpoint] += request.rows
        replica.socket.send_multipart(request.payload, copy=False)

    def run(self, layer: int, batch: ExpertBatch) -> torch.Tensor:
        return self.wait(self.submit(layer, batch))

    def submit(self, layer: int, batch: ExpertBatch) -> ExpertCall:
        """Send every group's rows to a replica of its pool; returns at once."""
        if self._pending is not None and not self._in_flight:  # replica indices stay valid in flight
            self._apply_pending()
        hidden_size = batch.hidden.shape[1]
        dtype = str(batch.hidden.dtype).removeprefix("torch.")
        call = ExpertCall(hidden_size, batch.hidden.dtype, self.partition.num_groups)
        now = time.monotonic()
        for group in range(self.partition.num_groups):
            part = batch.for_group(self.partition, group)
            if part.num_rows == 0:
                call.results[group] = batch.hidden.new_empty(0, hidden_size)
                continue
            request_id = next(self._ids)
            header = ExpertRequestHeader(request_id, layer, part.counts, hidden_size, dtype)
            payload = [
                header.encode(),
                tensor_frame(part.hidden),
                tensor_frame(part.weights.to(part.hidden.dtype)),
            ]
            request = _InFlight(call, group, -1, part.num_rows, payload)
            self._in_flight[request_id] = request
            call.waiting += 1
            try:
                self._send(request, now)
            except ExpertPoolUnavailableError:
                self._abandon()
                raise
        return call

    def wait(self, call: ExpertCall) -> torch.Tensor:
        """The submitted layer's [n, H] output rows, in the order of its batch."""
        try:
            self._collect(call)
        except BaseException:
            self._abandon()  # the step fails as a whole: nobody will wait for its other calls
            raise
        return torch.cat([call.results[g] for g in range(call.num_groups)])

    def _abandon(self) -> None:
        for request in self._in_flight.values():
            if request.replica >= 0:
                replica = self._pools[request.group][request.replica]
                replica.outstanding = max(0, replica.outstanding - request.rows)
        self._in_flight.clear()

    def _collect(self, call: ExpertCall) -> None:
        poller = zmq.Poller()
        for pool in self._pools.values():
            for replica in pool:
                poller.register(replica.socket, zmq.POLLIN)
        while call.waiting:
            deadline = min(r.deadline for r in self._in_flight.values())
            ready = dict(poller.poll(timeout=max(0.0, deadline - time.monotonic()) * 1000))
            for sock in ready:
                # drain: several calls may have answers queued on one socket, and a reply
                # already here must not be mistaken for a timeout below
                while not sock.closed:  # a fail-over closes the failed replica's socket
                    try:
                        header_raw, body = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._receive(json.loads(header_raw.bytes), body, poller)
            now = time.monotonic()
            for request in [r for r in self._in_flight.values() if r.deadline <= now]:
                if request.deadline <= now:  # not already resent along with another one
                    self._fail_over(request, poller)

    def _receive(self, header: dict, body: zmq.Frame, poller: zmq.Poller) -> None:
        """Files one reply under its call, or fails its replica over."""
        request = self._in_flight.get(header["request_id"])
        if request is None:
            return  # a late answer to a request already resent elsewhere
        replica = self._pools[request.group][request.replica]
        replica.outstanding = max(0, replica.outstanding - request.rows)
        if not header["ok"]:
            self._fail_over(request, poller)
            return
        replica.failures = 0
        call = request.call
        call.results[request.group] = frame_tensor(body, call.dtype, (request.rows, call.hidden_size)).clone()
        call.waiting -= 1
        del self._in_flight[header["request_id"]]

    def _fail_over(self, request: _InFlight, poller: zmq.Poller) -> None:
        replica = self._pools[request.group][request.replica]
        replica.failures += 1
        # a replica that keeps failing (dead, not slow) is retried ever more rarely, up to a minute
        replica.down_until = time.monotonic() + min(60.0, self.cooldown_s * 2 ** (replica.failures - 1))
        poller.unregister(replica.socket)
        self._reset(replica)
        poller.register(replica.socket, zmq.POLLIN)
        # the reset socket drops every answer still due from it, not only this request's
        stranded = [
            r for r in self._in_flight.values() if r.group == request.group and r.replica == request.replica
        ]
        for r in stranded:  # `request` among them
            self._send(r, time.monotonic())

    def endpoints(self) -> dict[int, list[str]]:
        """Each group's replica endpoints now (for metrics; safe from another thread)."""
        return {group: [r.endpoint for r in pool] for group, pool in list(self._pools.items())}

    def close(self) -> None:
        for pool in self._pools.values():
            for replica in pool:
                replica.socket.close(linger=0)
