"""Automatic prefix caching: block addresses, the allocator's sharing and eviction, and the bar
that matters, greedy output with the cache token for token equal to greedy output without it."""

from __future__ import annotations

import pytest
import torch

from expertmesh.engine.config import EngineConfig
from expertmesh.engine.kv_cache import BlockAllocator
from expertmesh.engine.llm_engine import LLMEngine
from expertmesh.engine.prefix_cache import PrefixCache, chain_hashes, reusable_blocks, root_hash
from expertmesh.engine.sampling_params import SamplingParams

BLOCK = 16
ROOT = root_hash("test")


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- addresses (pure) ---------------------------------------------------------------------------


def test_a_block_address_covers_everything_before_it():
    a, b = tokens(40, 1), tokens(40, 2)
    same_start = a[:16] + b[16:]
    assert len(chain_hashes(ROOT, a, BLOCK)) == 2  # the partial third block has no address
    assert chain_hashes(ROOT, same_start, BLOCK)[0] == chain_hashes(ROOT, a, BLOCK)[0]
    assert chain_hashes(ROOT, same_start, BLOCK)[1] != chain_hashes(ROOT, a, BLOCK)[1]
    # the second block alone equal is no match: its address includes the first
    swapped = b[:16] + a[16:]
    assert chain_hashes(ROOT, swapped, BLOCK)[1] != chain_hashes(ROOT, a, BLOCK)[1]
    assert chain_hashes(root_hash("other dtype"), a, BLOCK)[0] != chain_hashes(ROOT, a, BLOCK)[0]
    # chained on from a parent, as the output's blocks are
    assert chain_hashes(chain_hashes(ROOT, a, BLOCK)[0], a[16:], BLOCK) == chain_hashes(ROOT, a, BLOCK)[1:]


@pytest.mark.parametrize(("prompt", "reusable"), [(1, 0), (16, 0), (17, 1), (32, 1), (33, 2), (47, 2)])
def test_the_last_prompt_token_is_always_computed(prompt, reusable):
    assert reusable_blocks(prompt, BLOCK) == reusable


# ---- the allocator --------------------------------------------------------------------------------


def test_cached_blocks_are_shared_parked_and_evicted_oldest_and_tail_first():
    cache = PrefixCache()
    alloc = BlockAllocator(6, cache)
    first = alloc.allocate(3)
    hashes = chain_hashes(ROOT, tokens(48, 3), BLOCK)
    for block, h in zip(first, hashes, strict=True):
        cache.add(block, h)
    alloc.share(first[:2])  # a second request reuses the first two blocks
    alloc.free(first)  # the first request ends: its third block goes idle, the two stay held
    assert [alloc.refs(b) for b in first] == [1, 1, 0] and cache.num_idle == 1
    assert alloc.num_free == 3 + 1
    alloc.free(first[:2])  # the second ends too: all idle, the head parked last
    assert cache.longest_prefix(hashes) == first and alloc.num_free == 6
    fresh = alloc.allocate(3)  # plain free blocks go first: nothing evicted
    assert set(fresh).isdisjoint(first) and cache.num_cached == 3
    evicted = alloc.allocate(1)  # then the idle block unused longest: the tail
    assert evicted == [first[2]] and cache.longest_prefix(hashes) == first[:2]
    alloc.share(first[:1])  # held again: never evicted while held
    assert alloc.allocate(1) == [first[1]] and alloc.num_free == 0
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        alloc.allocate(1)


def test_the_same_content_computed_twice_keeps_one_address():
    cache = PrefixCache()
    alloc = BlockAllocator(2, cache)
    a, b = alloc.allocate(2)
    h = chain_hashes(ROOT, tokens(16, 4), BLOCK)[0]
    cache.add(a, h)
    cache.add(b, h)  # a second request computed the same block at the same time
    assert cache.longest_prefix([h]) == [a] and not cache.holds(b)
    alloc.free([a, b])
    assert cache.num_idle == 1 and alloc.num_free == 2


# ---- the engine: with the cache, the same tokens ----------------------------------------------------


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)


def run_one(engine: LLMEngine, prompt: list[int], max_tokens: int = 8):
    request = engine.add_request(prompt, greedy(max_tokens))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == request:
                final = out
    return final


@pytest.fixture(scope="module")
def engines(make_engine):
    """With the cache and without, otherwise alike; a small step budget so long prompts are
    prefilled in chunks, around the cached part too."""
    return (
        make_engine(enable_prefix_caching=True, max_num_batched_tokens=48, max_num_seqs=8),
        make_engine(enable_prefix_caching=False, max_num_batched_tokens=48, max_num_seqs=8),
    )


@pytest.mark.parametrize("shared", [5, 16, 23, 32, 47, 64])
def test_a_shared_prefix_of_any_length_gives_the_same_tokens(engines, shared):
    cached, plain = engines
    prefix = tokens(shared, 10 + shared)
    first, second = prefix + tokens(9, 1), prefix + tokens(13, 2)
    for prompt in (first, second):
        with_cache, without = run_one(cached, prompt), run_one(plain, prompt)
        assert with_cache.outputs[0].token_ids == without.outputs[0].token_ids
        assert without.num_cached_tokens == 0
    # the second request reused every full block of the shared part
    assert with_cache.num_cached_tokens == (shared // BLOCK) * BLOCK


def test_a_request_that_is_a_prefix_of_another_both_ways(engines):
    cached, plain = engines
    short = tokens(40, 20)
    long = short + tokens(30, 21)
    assert run_one(cached, short).outputs == run_one(plain, short).outputs
    reply = run_one(cached, long)
    assert reply.outputs[0].token_ids == run_one(plain, long).outputs[0].token_ids
    assert reply.num_cached_tokens == 32  # the short prompt's two full blocks
    again = run_one(cached, short)  # wholly cached: its last token is computed all the same
    assert again.outputs[0].token_ids == run_one(plain, short).outputs[0].token_ids
    assert again.num_cached_tokens == reusable_blocks(len(short), BLOCK) * BLOCK


def test_a_conversation_reuses_its_previous_turn_output_included(engines):
    cached, plain = engines
    turn, previous = tokens(37, 30), []
    for i in range(3):
        reply = run_one(cached, turn, max_tokens=12)
        want = run_one(plain, turn, max_tokens=12)
        assert reply.outputs[0].token_ids == want.outputs[0].token_ids
        if i:  # the previous prompt and the blocks its answer filled (its last token never fed)
            assert reply.num_cached_tokens == (len(previous) + 11) // BLOCK * BLOCK
        previous = turn
        turn = turn + reply.outputs[0].token_ids + tokens(7, 31 + i)


def test_requests_sharing_a_prefix_in_one_batch(engines):
    cached, plain = engines
    prefix = tokens(35, 40)
    prompts = [prefix + tokens(4 + i, 41 + i) for i in range(4)]
    run_one(cached, prefix + tokens(3, 49))  # cache the prefix first
    ids = [cached.add_request(p, greedy(10)) for p in prompts]
    finals = {}
    while cached.has_unfinished_requests():
        finals |= {o.request_id: o for o in cached.step() if o.finished}
    for request, prompt in zip(ids, prompts, strict=True):
        assert finals[request].outputs[0].token_ids == run_one(plain, prompt, 10).outputs[0].token_ids
        assert finals[request].num_cached_tokens == 32


def test_an_aborted_request_leaves_the_blocks_another_shares(engines):
    cached, plain = engines
    prefix = tokens(50, 60)
    first, second = prefix + tokens(6, 61), prefix + tokens(8, 62)
    run_one(cached, prefix + tokens(2, 63))  # the prefix is cached
    a = cached.add_request(first, greedy(40))
    b = cached.add_request(second, greedy(20))
    cached.step()
    cached.step()
    shared = cached._requests[a].blocks[:3]
    assert cached._requests[b].blocks[:3] == shared
    assert cached.abort_request(a)
    assert all(cached.allocator.refs(block) == 1 for block in shared)  # b still holds them
    finals = {}
    while cached.has_unfinished_requests():
        finals |= {o.request_id: o for o in cached.step() if o.finished}
    assert finals[b].outputs[0].token_ids == run_one(plain, second, 20).outputs[0].token_ids
    assert cached.allocator.num_free == cached.allocator.num_blocks


def test_eviction_under_memory_pressure_keeps_tokens_right(make_engine):
    # room for about two requests' blocks: every new prompt evicts the older cached ones
    block_bytes = make_engine().cache.bytes_per_token * BLOCK
    small = dict(
        max_num_seqs=2, max_num_batched_tokens=64, max_model_len=96, kv_cache_memory_bytes=9 * block_bytes
    )
    cached = make_engine(enable_prefix_caching=True, **small)
    plain = make_engine(enable_prefix_caching=False, **small)
    assert cached.allocator.num_blocks == 9
    prompts = [tokens(50, 70 + i) for i in range(5)]
    for prompt in [*prompts, prompts[0], prompts[4], prompts[0]]:
        assert run_one(cached, prompt).outputs[0].token_ids == run_one(plain, prompt).outputs[0].token_ids
    stats = cached.prefix_cache_stats()
    assert 0 < stats["hits"] < stats["queries"] and stats["cached_blocks"] <= 9


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_other_caches_and_bfloat16(tiny_checkpoint, arch):
    """MLA's latent cache, and a bf16 cache: the same tokens with the cache as without."""
    path = tiny_checkpoint(arch)
    config = dict(max_num_batched_tokens=48, max_num_seqs=4)
    for dtype in ("float32", "bfloat16"):
        cached = LLMEngine.from_checkpoint(path, dtype, EngineConfig(enable_prefix_caching=True, **config))
        plain = LLMEngine.from_checkpoint(path, dtype, EngineConfig(enable_prefix_caching=False, **config))
        prefix = tokens(40, 80)
        for prompt in (prefix + tokens(5, 81), prefix + tokens(9, 82)):
            reply = run_one(cached, prompt)
            assert reply.outputs[0].token_ids == run_one(plain, prompt).outputs[0].token_ids, dtype
        assert reply.num_cached_tokens == 32


def test_off_is_todays_engine(engines):
    _, plain = engines
    prompt = tokens(40, 90)
    run_one(plain, prompt)
    assert run_one(plain, prompt).num_cached_tokens == 0
    assert plain.allocator.prefix_cache is None
    assert plain.prefix_cache_stats() == {"enabled": False, "queries": 0, "hits": 0, "cached_blocks": 0}


def test_requests_arriving_together_compute_their_shared_prefix_once(make_engine):
    """Four requests with a 64-token prefix nobody has cached, submitted at once: the first
    computes the prefix, the others wait that step and share it, with the same tokens."""
    cached = make_engine(enable_prefix_caching=True, max_num_batched_tokens=512, max_num_seqs=8)
    plain = make_engine(enable_prefix_caching=False, max_num_batched_tokens=512, max_num_seqs=8)
    prefix = tokens(64, 100)
    prompts = [prefix + tokens(5, 101 + i) for i in range(4)]
    ids = [cached.add_request(p, greedy(6)) for p in prompts]
    prefilled, finals = 0, {}
    while cached.has_unfinished_requests():
        finals |= {o.request_id: o for o in cached.step() if o.finished}
        prefilled += cached.last_step.prefill_tokens
    assert prefilled == 69 + 3 * 5  # the prefix once, then each request's own tokens
    assert [finals[i].num_cached_tokens for i in ids] == [0, 64, 64, 64]
    for request, prompt in zip(ids, prompts, strict=True):
        assert finals[request].outputs[0].token_ids == run_one(plain, prompt, 6).outputs[0].token_ids
