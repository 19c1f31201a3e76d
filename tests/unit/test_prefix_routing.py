"""The prefix-aware routing decision and its inputs, as pure functions."""

from __future__ import annotations

from expertmesh.serve.prefix_routing import (
    TEXT_BLOCK_CHARS,
    ReplicaView,
    RoutingHistory,
    choose_by_prefix,
    prompt_blocks,
)

SYSTEM = "You are a careful assistant. Answer in one line. " * 8


def test_prompt_blocks_are_chained_over_text_and_token_ids():
    a, b = prompt_blocks(SYSTEM + "What is 2 + 2?"), prompt_blocks(SYSTEM + "Name a colour.")
    shared = len(SYSTEM) // TEXT_BLOCK_CHARS
    assert a[:shared] == b[:shared] and len(a) == (len(SYSTEM) + 14) // TEXT_BLOCK_CHARS
    assert prompt_blocks("x" * (TEXT_BLOCK_CHARS - 1)) == []  # no full block
    # the same block after a different start is another address
    assert prompt_blocks("y" * TEXT_BLOCK_CHARS + "z" * TEXT_BLOCK_CHARS)[1] != prompt_blocks("z" * 128)[1]
    ids = list(range(100, 148))
    assert len(prompt_blocks(ids)) == 3 and prompt_blocks(ids[:40])[:2] == prompt_blocks(ids)[:2]


def view(name: str, queue: int, matched: int) -> ReplicaView:
    return ReplicaView(name, queue, matched)


def test_the_replica_holding_most_of_the_prompt_wins_within_the_queue_bound():
    replicas = [view("a", 2, 0), view("b", 3, 5), view("c", 1, 2)]
    assert choose_by_prefix(replicas, max_queue_gap=4) == "b"
    # b's queue is 2 longer than the shortest: beyond a gap of 1 it is overloaded for this
    assert choose_by_prefix(replicas, max_queue_gap=1) == "c"
    # ties go to the shorter queue, then the name
    assert choose_by_prefix([view("a", 2, 5), view("b", 1, 5)], 4) == "b"
    assert choose_by_prefix([view("b", 1, 5), view("a", 1, 5)], 4) == "b"


def test_no_replica_holding_any_of_the_prompt_falls_back_to_least_loaded():
    assert choose_by_prefix([view("a", 0, 0), view("b", 3, 0)], 4) is None
    assert choose_by_prefix([view("a", 0, 0), view("b", 9, 7)], 4) is None  # the holder is overloaded
    assert choose_by_prefix([], 4) is None


def test_history_matches_leading_blocks_and_forgets_the_oldest():
    history = RoutingHistory(capacity_blocks=4)
    first, second = prompt_blocks(SYSTEM), prompt_blocks("q" * 256)
    history.record("a", first[:3])
    assert history.matched_blocks("a", first) == 3 and history.matched_blocks("b", first) == 0
    history.record("a", second[:2])  # 5 blocks for 4 places: first[0] goes
    assert history.matched_blocks("a", first) == 0 and history.matched_blocks("a", second) == 2
    history.forget("a")
    assert history.matched_blocks("a", second) == 0
