"""Prefix-aware routing across a revision's engine replicas, on Serve's own extension point.

`PrefixAffinityRouter` is a Serve `RequestRouter` for the Engine deployment (the one Serve's
`PrefixCacheAffinityRouter` is built on): a request goes to the replica whose prefix cache most
likely holds the start of its prompt, unless that replica's queue is longer than the shortest by
more than `max_queue_gap`; with no replica holding any of it, to the least loaded.

What feeds the choice is the router's own routing history: the chained block addresses of every
prompt it sent to each replica, kept per replica up to the size of a replica's cache. Not the
replicas' cache contents, because those lag: a burst of requests with a new shared prefix
arrives before the first of them has been prefilled, and each would then look new and be
spread over every replica, each computing the prefix again. The history knows at once. What it
can get wrong (a block the replica has since evicted) costs one prefill, as without routing.

The decision is a pure function (`choose_by_prefix`); the router class only gathers its inputs.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from expertmesh.engine.prefix_cache import BlockHash, chain, chain_hashes, root_hash

# Prompt blocks the router addresses: the engine's block of token ids, or for text (the router
# does not tokenize) a run of characters of about as many tokens.
TOKEN_BLOCK = 16
TEXT_BLOCK_CHARS = 64
_ROOT = root_hash("expertmesh prompt blocks")


def prompt_blocks(prompt: str | Sequence[int]) -> list[BlockHash]:
    """Chained addresses of a prompt's full blocks (pure): equal prompt starts, equal addresses."""
    if isinstance(prompt, str):
        full = range(0, len(prompt) - TEXT_BLOCK_CHARS + 1, TEXT_BLOCK_CHARS)
        return chain(_ROOT, (prompt[start : start + TEXT_BLOCK_CHARS].encode() for start in full))
    return chain_hashes(_ROOT, list(prompt), TOKEN_BLOCK)


@dataclass(frozen=True)
class ReplicaView:
    replica: str
    queue_len: int  # requests ongoing or queued at the replica, as Serve last saw them
    matched_blocks: int  # leading prompt blocks its history holds


def choose_by_prefix(replicas: Sequence[ReplicaView], max_queue_gap: int) -> str | None:
    """The replica to send a request to, or None for the least-loaded fallback (pure).

    Among replicas whose queue is at most `max_queue_gap` longer than the shortest, the one
    holding most of the prompt's start; ties go to the shorter queue, then the name. None when
    no such replica holds any of it.
    """
    if not replicas:
        return None
    shortest = min(r.queue_len for r in replicas)
    eligible = [r for r in replicas if r.queue_len - shortest <= max_queue_gap]
    best = max(eligible, key=lambda r: (r.matched_blocks, -r.queue_len, r.replica))
    return best.replica if best.matched_blocks else None


class RoutingHistory:
    """Per replica, the prompt block addresses sent to it, least recently sent first, bounded."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self._sent: dict[str, OrderedDict[BlockHash, None]] = {}

    def matched_blocks(self, replica: str, blocks: Sequence[BlockHash]) -> int:
        sent = self._sent.get(replica, {})
        n = 0
        while n < len(blocks) and blocks[n] in sent:
            n += 1
        return n

    def record(self, replica: str, blocks: Sequence[BlockHash]) -> None:
        sent = self._sent.setdefault(replica, OrderedDict())
        for block in blocks:
            sent[block] = None
            sent.move_to_end(block)
        while len(sent) > self.capacity:
            sent.popitem(last=False)

    def forget(self, replica: str) -> None:
        self._sent.pop(replica, None)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Serve's router for an Engine deployment; requests are `run_request(prompt, ...)` calls."""

    def initialize_state(self, max_queue_gap: int = 4, history_blocks: int = 65536) -> None:
        self.max_queue_gap = max_queue_gap
        self.history = RoutingHistory(history_blocks)

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    @staticmethod
    def _prompt_blocks(request: PendingRequest) -> list[BlockHash]:
        prompt = request.args[0] if request.args else None
        return prompt_blocks(prompt) if isinstance(prompt, str | list) else []

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        # least loaded first; equal queues in random order, so new prefixes spread over replicas
        by_load = sorted(random.sample(candidate_replicas, len(candidate_replicas)), key=self._queue_len)
        fallback = [[replica] for replica in by_load]
        if pending_request is None or len(candidate_replicas) < 2:
            return fallback
        blocks = self._prompt_blocks(pending_request)
        views = [
            ReplicaView(
                r.replica_id.unique_id,
                self._queue_len(r),
                self.history.matched_blocks(r.replica_id.unique_id, blocks),
            )
            for r in candidate_replicas
        ]
        best = choose_by_prefix(views, self.max_queue_gap)
        if best is None:
            return fallback
        chosen = next(r for r in candidate_replicas if r.replica_id.unique_id == best)
        return [[chosen], *[rank for rank in fallback if rank[0] is not chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.history.record(replica_id.unique_id, self._prompt_blocks(pending_request))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.history.forget(replica_id.unique_id)
