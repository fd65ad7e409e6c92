"""The in-memory prefix (prompt) cache of one engine, with a byte cap that holds.

A thin layer over mlx-lm's own `LRUPromptCache` (a token trie of KV caches, least
recently used evicted first, trimmable caches cut down to a shared prefix). What it
adds: the cap is enforced on real bytes (stored caches are materialized at once, so a
lazy slice never keeps a whole batch buffer alive behind the count), short matches
are not worth a copy (`MIN_REUSE_TOKENS`), an exact hit still leaves one token to
compute (generation needs an input), and hit/lookup counters for /metrics.

Short prompts: a repeated prompt shorter than `MIN_REUSE_TOKENS` is reused when all of it
but its last token is cached (an exact repeat): that skips the whole prefill pass (mlx-lm
runs the prompt less its last token as one pass, then the last token as the first decode
step), which is what mlx_lm.server's cache does for a repeated short prompt. Such
sequences are kept in a small LRU of their own (`SHORT_ENTRIES`, within the byte cap), so
a stream of distinct short prompts never evicts the long prefixes.

First tokens: the log-probabilities a prompt's first generated token was drawn from are a
function of the prompt alone (the model's output after its last token, before any
penalty). They are kept per prompt (`FIRST_ENTRIES`, a small LRU within the short share of
the cap), so an exact repeat of a prompt that asks for one token (a classification, a
probe, a retry) draws it from them with its own sampler: no forward pass at all
(`BatchEngine`'s instant answers). Longer completions still run the prompt's last token.

Engine thread only (imports MLX).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)

MIN_REUSE_TOKENS = 16
"""Fewer cached tokens than this are not reused: copying the entry costs more than
computing them."""

MIN_SHORT_TOKENS = 2
"""Shorter sequences are not kept at all (nothing left to reuse but the last token)."""
SHORT_ENTRIES = 8
"""Sequences shorter than MIN_REUSE_TOKENS kept at once (reused as exact repeats only)."""
SHORT_BYTES_SHARE = 16
"""The short sequences' LRU may take 1/this of the byte cap (the rest is the long ones')."""

FIRST_ENTRIES = 32
"""Prompts whose first-token log-probabilities are kept at once (one vocabulary row each)."""

_MODEL_KEY = "model"  # one model per engine


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        short_bytes = max_bytes // SHORT_BYTES_SHARE
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes - short_bytes) if max_bytes > 0 else None
        self._short = (LRUPromptCache(max_size=min(SHORT_ENTRIES, max_entries), max_bytes=short_bytes)
                       if short_bytes > 0 else None)
        self._first: OrderedDict[tuple[int, ...], mx.array] = OrderedDict()
        self._first_bytes = 0
        self._first_cap = short_bytes
        self.lookups = 0
        self.hits = 0
        self.first_hits = 0

    @property
    def enabled(self) -> bool:
        return self._lru is not None

    @property
    def nbytes(self) -> int:
        return sum(lru.nbytes for lru in (self._lru, self._short) if lru is not None) + self._first_bytes

    def __len__(self) -> int:
        """Cached KV sequences (the kept first-token rows are in `nbytes`, not here)."""
        return sum(len(lru) for lru in (self._lru, self._short) if lru is not None)

    def first_logprobs(self, tokens: Sequence[int]) -> mx.array | None:
        """The log-probabilities (one row, before any penalty) that `tokens`' first generated
        token was drawn from, when this prompt ran here before; None otherwise."""
        if self._lru is None:
            return None
        key = tuple(tokens)
        row = self._first.get(key)
        if row is None:
            return None
        self._first.move_to_end(key)
        self.lookups += 1
        self.hits += 1
        self.first_hits += 1
        return row

    def keep_first(self, tokens: Sequence[int], logprobs: mx.array) -> None:
        """Keep the row `tokens`' first token was drawn from (a copy: not the batch's buffer)."""
        if self._lru is None or not tokens:
            return
        key = tuple(tokens)
        if key in self._first:
            self._first.move_to_end(key)
            return
        row = logprobs * 1  # its own buffer: a row of the step's [batch, vocab] array would pin all of it
        mx.async_eval(row)
        if row.nbytes > self._first_cap:
            return
        self._first[key] = row
        self._first_bytes += row.nbytes
        while len(self._first) > FIRST_ENTRIES or self._first_bytes > self._first_cap:
            self._first_bytes -= self._first.popitem(last=False)[1].nbytes

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the longest usable cached prefix of `tokens`, and its length.

        The length is always < len(tokens): at least the last token is left to compute.
        """
        if self._lru is None:
            return None, 0
        self.lookups += 1
        found = self._nearest(self._lru, tokens)
        if found[0] is None and self._short is not None and len(tokens) <= MIN_REUSE_TOKENS:
            found = self._nearest(self._short, tokens)
        if found[0] is not None:
            self.hits += 1
        return found

    @staticmethod
    def _nearest(lru: LRUPromptCache, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        cache, rest = lru.fetch_nearest_cache(_MODEL_KEY, list(tokens))
        if cache is None:
            return None, 0
        cached = len(tokens) - len(rest)
        if cached == len(tokens):  # exact hit: give back the last token to compute
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            cached -= 1
        # A short match is not worth the copy, unless it is all but the last token: then the
        # whole prefill pass is saved.
        if cached < MIN_REUSE_TOKENS and not (0 < cached == len(tokens) - 1):
            return None, 0
        return cache, cached

    def shed(self, nbytes: int) -> int:
        """Drop least recently used entries until `nbytes` are freed or none is left; bytes freed."""
        if self._lru is None or nbytes <= 0:
            return 0
        before = self.nbytes
        while self._first and before - self.nbytes < nbytes:  # a row each
            self._first_bytes -= self._first.popitem(last=False)[1].nbytes
        if self._short is not None:  # the short ones first: each saves a pass, not a long prefill
            self._short.trim_to(n_bytes=max(self._short.nbytes - (nbytes - (before - self.nbytes)), 0))
        self._lru.trim_to(n_bytes=max(self._lru.nbytes - (nbytes - (before - self.nbytes)), 0))
        return before - self.nbytes

    def store(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep `cache` (the KV state of exactly `tokens`), evicting to stay within the caps."""
        short = len(tokens) < MIN_REUSE_TOKENS
        lru = self._short if short else self._lru
        if lru is None or len(tokens) < MIN_SHORT_TOKENS:
            return
        # Materialize (asynchronously, with the next step): an unevaluated slice would pin
        # the whole batch buffer it came from, behind the byte count.
        mx.async_eval([c.state for c in cache])
        if sum(c.nbytes for c in cache) > lru.max_bytes:
            return  # would evict everything and still not fit
        lru.insert_cache(_MODEL_KEY, list(tokens), cache)
