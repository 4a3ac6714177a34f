"""Automatic prefix caching: the KV entries of prompts' leading tokens, kept in blocks and reused by later prompts.

Chat requests repeat their beginning: the system turn, the ``tools`` block (300 tokens for three tools in the
built-in format), the earlier turns of a conversation. Computing those again for every request is most of a
tools request's prefill. As vLLM's automatic prefix caching does, the engine keeps the KV entries of each
prompt's full blocks of :data:`BLOCK` tokens, keyed by a hash chained over the blocks before them (a block's
entries depend on every token before it) and by the adapter that computed them (a LoRA changes the keys and
values; the key is the load's, so an adapter loaded again under the same name never reuses the old entries).
A later prompt starting with the same blocks prefills only its remaining tokens, attending to the cached ones.

Entries are the post-RoPE keys and values at positions ``0 .. n-1``, so they are valid for any row whose prompt
starts with those tokens at those positions (the engine gives every row its own position ids). Blocks are
evicted least recently used first, leaves before their parents (a lookup touches a chain from its end back to
its root), within a budget in bytes; ``max_bytes = 0`` turns caching off.

The cached entries are the same computation in a different batch shape, so a row's logits match those of a
full prefill to float rounding (tested: greedy tokens equal, logits within 1e-4 in float32).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16          # tokens per cached block (vLLM's default block size)


@dataclass
class _Block:
    kv: torch.Tensor            # [layers, 2, kv_heads, BLOCK, head_dim]: keys and values of this block's tokens
    tokens: tuple[int, ...]     # the block's tokens (checked on lookup: a hash collision never serves wrong KV)
    parent: tuple | None        # the key of the block before it


class PrefixCache:
    """Blocks of prompt KV entries by ``(adapter key, chained hash)``, LRU within ``max_bytes``."""

    def __init__(self, max_bytes: int, block: int = BLOCK) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self.bytes = 0
        self.queried_tokens = 0     # prompt tokens looked up (the ones a hit could have covered)
        self.hit_tokens = 0         # of those, served from the cache

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, owner: str, ids: list[int], blocks: int) -> list[tuple]:
        keys, h = [], hash(owner)
        for j in range(blocks):
            h = hash((h, tuple(ids[j * self.block:(j + 1) * self.block])))
            keys.append((owner, h))
        return keys

    def match(self, owner: str, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` the cache holds for ``owner`` (whole blocks; at most
        ``len(ids) - 1``: the last prompt token is always computed, its logits give the first answer token)."""
        if not self.enabled:
            return 0
        usable = (len(ids) - 1) // self.block
        n = 0
        for j, key in enumerate(self._keys(owner, ids, usable)):
            found = self._blocks.get(key)
            if found is None or found.tokens != tuple(ids[j * self.block:(j + 1) * self.block]):
                break
            n = j + 1
        return n * self.block

    def lookup(self, owner: str, ids: list[int], count: bool = True) -> tuple[int, torch.Tensor | None]:
        """``(n, kv)``: the cached leading ``n`` tokens of ``ids`` and their entries ``[layers, 2, H, n, D]``
        (``None`` when ``n == 0``); marks the blocks used and, with ``count``, counts the query and the hit."""
        n, blocks = self.blocks(owner, ids, count)
        return (n, torch.cat(blocks, dim=3)) if n else (0, None)

    def blocks(self, owner: str, ids: list[int], count: bool = True) -> tuple[int, list[torch.Tensor]]:
        """As :meth:`lookup`, the entries as the list of their blocks (``[layers, 2, H, block, D]`` each), for a
        caller that copies them straight into its own buffer."""
        n = self.match(owner, ids)
        if self.enabled and count:
            self.queried_tokens += len(ids) - 1
            self.hit_tokens += n
        if n == 0:
            return 0, []
        keys = self._keys(owner, ids, n // self.block)
        for key in reversed(keys):          # leaf first: the root ends most recent, evicted last
            self._blocks.move_to_end(key)
        return n, [self._blocks[k].kv for k in keys]

    def insert(self, owner: str, ids: list[int], kv: torch.Tensor, start: int = 0) -> None:
        """Keep the full blocks of ``ids`` whose entries ``kv [layers, 2, H, len(ids) - start, D]`` (the tokens
        from ``start``, a multiple of the block size) were just computed; blocks already held are kept as they are."""
        if not self.enabled:
            return
        assert start % self.block == 0
        blocks = len(ids) // self.block
        keys = self._keys(owner, ids, blocks)
        for j in range(start // self.block, blocks):
            key = keys[j]
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            lo = j * self.block - start
            piece = kv[:, :, :, lo:lo + self.block].clone()
            size = piece.numel() * piece.element_size()
            if size > self.max_bytes:
                return
            self._blocks[key] = _Block(piece, tuple(ids[j * self.block:(j + 1) * self.block]),
                                       keys[j - 1] if j else None)
            self.bytes += size
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.kv.numel() * block.kv.element_size()

    def drop_owners(self, keep: set[str]) -> None:
        """Forget the blocks of owners not in ``keep`` (adapters unloaded: their keys never come back)."""
        for key in [k for k in self._blocks if k[0] not in keep]:
            block = self._blocks.pop(key)
            self.bytes -= block.kv.numel() * block.kv.element_size()

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
