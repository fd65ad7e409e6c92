"""Which endpoints were recently sent which prompt prefix: the memory behind prefix affinity.

Every agent keeps a cache of the KV state of prompts it recently processed, and a
request whose prompt starts with such a prompt skips that much prefill. The router
cannot see those caches, so it remembers what it sent where (the Gateway API inference
extension's approximate prefix cache scorer does the same):

- A prompt is cut into blocks of `block_size` characters (a trailing partial block is
  ignored) and each block is hashed together with the hash before it, starting from a
  hash of the model's name. Block i's hash therefore stands for the whole prefix up to
  and including block i, of that model only: comparing two prompts' prefixes is
  comparing hashes, and prompts of different models never match.
- `PrefixIndex` maps (block hash, endpoint URL) pairs to nothing, in least-recently-used
  order, with at most `max_entries` pairs: memory is bounded whatever the traffic, and
  what endpoints were sent long ago (or endpoints that left the table) ages out.

Characters, not tokens: the router has no tokenizer, and prompts that share a prefix
in text share its tokens, all but the last few. Hashes are BLAKE2b (standard library,
stable across runs and processes, unlike `hash()`), 8 bytes: a collision among even
millions of entries is unlikely, and would only misplace one request. Pure data, no
clock, no I/O.

Router replicas share what they record (`mlxpool.router.sharing` carries `outbox` to
the others through Redis, which `merge` it), so each replica's index sees every
replica's traffic and N replicas place prefixes as one router would.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

BlockHash = bytes
"""The 8-byte hash of a prompt prefix ending at a block boundary."""

_DIGEST_SIZE = 8


def prompt_blocks(model: str, prompt: str, block_size: int, max_blocks: int) -> list[BlockHash]:
    """Chained hashes of the first `max_blocks` whole blocks of `prompt` (empty when shorter than a block)."""
    if block_size < 1 or max_blocks < 1:
        raise ValueError("block_size and max_blocks must be >= 1")
    previous = hashlib.blake2b(model.encode(), digest_size=_DIGEST_SIZE).digest()
    blocks: list[BlockHash] = []
    for start in range(0, min(len(prompt) // block_size, max_blocks) * block_size, block_size):
        chained = hashlib.blake2b(previous, digest_size=_DIGEST_SIZE)
        # surrogatepass: a lone surrogate (valid in a JSON string) must not fail the pick.
        chained.update(prompt[start:start + block_size].encode("utf-8", "surrogatepass"))
        previous = chained.digest()
        blocks.append(previous)
    return blocks


class PrefixIndex:
    """(block hash, endpoint URL) pairs recently sent, least recently used evicted first."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[BlockHash, str], None] = OrderedDict()
        self.outbox: deque[tuple[tuple[BlockHash, ...], str]] | None = None
        """When set (`share`), every `record` is also queued here for other router replicas."""

    def share(self, max_pending: int) -> deque[tuple[tuple[BlockHash, ...], str]]:
        """Queue what `record` remembers from now on (at most `max_pending`, oldest dropped)."""
        self.outbox = deque(maxlen=max_pending)
        return self.outbox

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, blocks: Sequence[BlockHash], urls: Sequence[str]) -> list[int]:
        """Per URL, how many leading `blocks` it was sent (read-only: a match is not a use)."""
        matched = []
        for url in urls:
            n = 0
            while n < len(blocks) and (blocks[n], url) in self._entries:
                n += 1
            matched.append(n)
        return matched

    def record(self, blocks: Sequence[BlockHash], url: str) -> None:
        """Remember that `url` was sent the prompt of `blocks`, evicting the least recently used."""
        if self.outbox is not None and blocks:
            self.outbox.append((tuple(blocks), url))
        self.merge(blocks, url)

    def merge(self, blocks: Sequence[BlockHash], url: str) -> None:
        """As `record`, for what another replica sent (never queued again)."""
        # Deepest block first, so a prompt's leading blocks are the most recent: eviction
        # trims remembered prompts from their tail, never leaving a tail no match can reach.
        for block in reversed(blocks):
            key = (block, url)
            if key in self._entries:
                self._entries.move_to_end(key)
            else:
                self._entries[key] = None
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
