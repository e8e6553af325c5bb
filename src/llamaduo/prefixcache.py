"""The server's prompt-prefix cache: recent prompts' keys and values, reused by prompts that start alike.

Applications put the same system prompt, tool list or few-shot examples ahead of every question, and
a chat's next turn repeats the conversation so far; on a CPU, prefilling those tokens again is most
of a request's time to first token. `rowbatch.RowBatch.add` looks each prompt up here before its
prefill: the longest prefix it shares with a cached prompt of the same adapter comes from the cache,
and only the rest of the prompt runs through the model (`rowcache.prefill`'s `reuse`). A prompt seen
before takes the cached last-token logits too and runs nothing. A prefix's keys and values are the
ones the full prefill computes (causal attention: a token's keys depend on the tokens before it
only); the rest of the prompt runs in a shorter forward, whose kernels may round differently (on
the tiny Gemma 3 layout: within 1e-6 of the full prefill in fp32, bit for bit in int8). Entries go
least recently used first beyond `serve.prefix_cache_mb`. Only the generation thread uses it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

BLOCK = 16  # prompts are matched by blocks of this many tokens (then token by token within the last one)


@dataclass
class Entry:
    keys: list[Any]  # per layer [1, kv heads, tokens, dim], as the prefill left them
    values: list[Any]
    last: Any  # the last prompt token's logits [vocab]
    nbytes: int
    blocks: list[int]  # the chained hashes of the prompt's whole blocks (`PrefixCache._chain`)


@dataclass
class Reuse:
    """What a lookup found: the first `tokens` of the prompt are cached (`entry`'s first columns)."""

    tokens: int
    entry: Entry
    whole: bool  # the very prompt: its keys, values and last logits are the entry's


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens `a` and `b` share (a binary search over slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    """Recent prompts' prefill results, keyed by (adapter, prompt tokens), within a byte budget.

    A lookup costs the prompt's length, not the number of entries: each stored prompt's whole blocks
    of `block` tokens are indexed by a chained hash (block k's hash covers blocks 1..k and the adapter),
    the deepest block a new prompt matches names an entry, and the shared tokens are then counted on
    that entry's tokens (so a hash collision only costs a miss). Prefixes shorter than a block are not
    reused: the saving would not pay the lookup."""

    def __init__(self, budget_bytes: int, block: int = BLOCK):
        self.budget, self.block = budget_bytes, block
        self.bytes = 0
        self._entries: collections.OrderedDict[tuple[str | None, tuple[int, ...]], Entry] = collections.OrderedDict()
        self._by_block: dict[int, tuple[str | None, tuple[int, ...]]] = {}  # block hash -> newest entry with it
        self.lookups = 0
        self.hits = 0
        self.reused_tokens = 0  # prompt tokens taken from the cache instead of prefilled

    def __len__(self) -> int:
        return len(self._entries)

    def _chain(self, adapter: str | None, prompt: tuple[int, ...]) -> list[int]:
        h, out = hash(adapter), []
        for end in range(self.block, len(prompt) + 1, self.block):
            h = hash((h, prompt[end - self.block:end]))
            out.append(h)
        return out

    def lookup(self, adapter: str | None, ids: list[int]) -> Reuse | None:
        """The longest cached prefix of `ids` under `adapter` (at least a block), or None."""
        if self.budget <= 0 or not ids:
            return None
        self.lookups += 1
        prompt = tuple(ids)
        exact = self._entries.get((adapter, prompt))
        if exact is not None:
            self._touch((adapter, prompt))
            self.hits += 1
            self.reused_tokens += len(prompt)
            return Reuse(len(prompt), exact, True)
        found = None
        for h in self._chain(adapter, prompt):
            if (key := self._by_block.get(h)) is None:
                break
            found = key
        # The last prompt token runs: its logits pick the first answer token.
        best = 0 if found is None else min(common_prefix(found[1], prompt), len(prompt) - 1)
        if best < self.block:
            return None
        self._touch(found)
        self.hits += 1
        self.reused_tokens += best
        return Reuse(best, self._entries[found], False)

    def _touch(self, key: tuple[str | None, tuple[int, ...]]) -> None:
        """Make an entry the most recent, and the one its blocks name (it is now the last to go)."""
        self._entries.move_to_end(key)
        for h in self._entries[key].blocks:
            self._by_block[h] = key

    def store(self, adapter: str | None, ids: list[int], keys: list[Any], values: list[Any], last: Any) -> None:
        """Keep a prompt's prefill (tensors nothing writes to later), evicting the oldest beyond the budget."""
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values, last))
        if self.budget <= 0 or nbytes > self.budget or not ids:
            return
        key = (adapter, tuple(ids))
        if (old := self._entries.pop(key, None)) is not None:
            self.bytes -= old.nbytes
        blocks = self._chain(adapter, key[1])
        self._entries[key] = Entry(keys, values, last, nbytes, blocks)
        for h in blocks:
            self._by_block[h] = key
        self.bytes += nbytes
        while self.bytes > self.budget:
            gone_key, gone = self._entries.popitem(last=False)
            self.bytes -= gone.nbytes
            for h in gone.blocks:
                if self._by_block.get(h) == gone_key:
                    del self._by_block[h]
