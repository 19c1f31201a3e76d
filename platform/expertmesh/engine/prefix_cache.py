"""Automatic prefix caching: full KV cache blocks addressed by what they hold.

A block's address is a hash chained over its tokens and every block before it, from a root that
stands for what else shapes K/V (the cache's dtype; one engine serves one model revision), so
two sequences share a block only when everything up to its end is the same. Blocks are shared
by reference count (`BlockAllocator`); a cached block no request holds stays here, idle, until
its memory is needed, and the idle ones go oldest first. Within a finished request, its tail
blocks go before its head: a later request is likelier to share a prompt's start than its end.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
_DIGEST_BYTES = 16  # 128 bits: a collision, which would serve another prompt's K/V, is out of reach


def root_hash(salt: str) -> BlockHash:
    """The parent of a sequence's first block."""
    return hashlib.blake2b(salt.encode(), digest_size=_DIGEST_BYTES).digest()


def chain(parent: BlockHash, blocks: Iterable[bytes]) -> list[BlockHash]:
    """Each block's address, chained on from `parent`, the address of the block before them (pure)."""
    hashes = []
    for block in blocks:
        parent = hashlib.blake2b(parent + block, digest_size=_DIGEST_BYTES).digest()
        hashes.append(parent)
    return hashes


def chain_hashes(parent: BlockHash, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """The address of each full block of `token_ids` (a partial last block has none)."""
    full = range(0, len(token_ids) - block_size + 1, block_size)
    return chain(parent, (array("q", token_ids[start : start + block_size]).tobytes() for start in full))


def reusable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """How many leading blocks of a prompt may come from the cache (pure): only full blocks
    that end before the prompt's last token, which is always computed so the first output
    token is sampled from fresh logits."""
    return (num_prompt_tokens - 1) // block_size


class PrefixCache:
    """Which block holds which content, and which cached blocks no request holds (idle)."""

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # oldest first

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def holds(self, block: int) -> bool:
        return block in self._hash_of

    def longest_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks holding the longest run of `hashes` from the first."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def add(self, block: int, block_hash: BlockHash) -> None:
        """Record a block whose K/V are now computed. When another block already holds the same
        content (two requests computed it at once), that one stays the address and this block
        stays plain, to be freed as usual."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def park(self, block: int) -> None:
        """A cached block the last request let go of: idle, newest."""
        self._idle[block] = None

    def unpark(self, block: int) -> None:
        """An idle block a new request shares: in use again."""
        del self._idle[block]

    def evict_oldest(self) -> int:
        """Forget the idle block unused longest; it is free for any content."""
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def evict_all_idle(self) -> list[int]:
        return [self.evict_oldest() for _ in range(len(self._idle))]
