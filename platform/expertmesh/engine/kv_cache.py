"""Paged KV cache: a fixed number of blocks, handed to sequences whole."""

from __future__ import annotations

import torch

from expertmesh.model.attention import LayerKVCache
from expertmesh.model.config import ModelConfig
from expertmesh.model.mla import LatentKVCache


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes a token takes over all layers: K and V per KV head, or MLA's latent and rope key."""
    return cfg.num_layers * cfg.kv_values_per_token * dtype.itemsize


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        taken, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


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
