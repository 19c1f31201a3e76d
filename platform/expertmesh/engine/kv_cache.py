"""Paged KV cache: a fixed number of blocks, handed to sequences whole."""

from __future__ import annotations

import torch

from expertmesh.engine.prefix_cache import PrefixCache
from expertmesh.model.attention import LayerKVCache
from expertmesh.model.config import ModelConfig
from expertmesh.model.mla import LatentKVCache


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes a token takes over all layers: K and V per KV head, or MLA's latent and rope key."""
    return cfg.num_layers * cfg.kv_values_per_token * dtype.itemsize


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Cache blocks by reference count. With a PrefixCache, a block that holds cached content and
    that no request holds any more stays cached (idle) and counts as free: it is given out again
    for new content only when no plain free block is left, oldest first."""

    def __init__(self, num_blocks: int, prefix_cache: PrefixCache | None = None):
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        idle = self.prefix_cache.num_idle if self.prefix_cache is not None else 0
        return len(self._free) + idle

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for new content, each held once."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        plain = min(n, len(self._free))
        taken, self._free = self._free[len(self._free) - plain :], self._free[: len(self._free) - plain]
        blocks = taken[::-1]
        if self.prefix_cache is not None:
            blocks += [self.prefix_cache.evict_oldest() for _ in range(n - plain)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Hold cached blocks once more (a new request reuses their content)."""
        for block in blocks:
            if self._refs[block] == 0:
                self.prefix_cache.unpark(block)  # type: ignore[union-attr]  # only cached blocks are shared
            self._refs[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Let go of blocks once; a block nobody holds is free, or idle if its content is cached.
        A request's tail goes idle first, so it is evicted before the request's head."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if self.prefix_cache is not None and self.prefix_cache.holds(block):
                self.prefix_cache.park(block)
            else:
                self._free.append(block)

    def forget_idle(self) -> None:
        """Drop every idle cached block's content (e.g. the warm-up's), freeing the blocks."""
        if self.prefix_cache is not None:
            self._free.extend(self.prefix_cache.evict_all_idle())


class KVCache:
    """One LayerKVCache (or, for MLA, LatentKVCache) per layer, sized from a memory budget."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.block_size, self.num_blocks = block_size, num_blocks
        slots = num_blocks * block_size
        self.bytes_per_token = bytes_per_token(cfg, dtype)
        self.layout = (
            f"MLA latent {cfg.mla.kv_lora_rank} + rope key {cfg.mla.qk_rope_head_dim}"
            if cfg.mla is not None
            else f"K and V, {cfg.num_kv_heads} heads x {cfg.head_dim}"
        )
        self.layers: list[LayerKVCache] | list[LatentKVCache] = [
            LatentKVCache(slots, cfg.mla.cache_width, dtype)
            if cfg.mla is not None
            else LayerKVCache(slots, cfg.num_kv_heads, cfg.head_dim, dtype)
            for _ in range(cfg.num_layers)
        ]

    def describe(self) -> dict:
        """What the cache holds per token, for `info`: MLA keeps its latent and rope key, not K and V."""
        return {
            "layout": self.layout,
            "bytes_per_token": self.bytes_per_token,
            "blocks": self.num_blocks,
            "block_size": self.block_size,
        }

    @staticmethod
    def blocks_in_budget(
        cfg: ModelConfig, dtype: torch.dtype, budget_bytes: int, block_size: int, max_useful_tokens: int
    ) -> int:
        """Blocks that fit the budget, but no more than can ever be in use at once."""
        fit = budget_bytes // (bytes_per_token(cfg, dtype) * block_size)
        return max(1, min(fit, blocks_for(max_useful_tokens, block_size)))
