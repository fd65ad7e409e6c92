"""The in-memory prefix (prompt) cache of one engine, with a byte cap that holds.

A thin layer over mlx-lm's own `LRUPromptCache` (a token trie of KV caches, least
recently used evicted first, trimmable caches cut down to a shared prefix). What it
adds: the cap is enforced on real bytes (stored caches are materialized at once, so a
lazy slice never keeps a whole batch buffer alive behind the count), short matches
are not worth a copy (`MIN_REUSE_TOKENS`), an exact hit still leaves one token to
compute (generation needs an input), and hit/lookup counters for /metrics.

Engine thread only (imports MLX).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)

MIN_REUSE_TOKENS = 16
"""Fewer cached tokens than this are not reused: copying the entry costs more than
computing them."""

_MODEL_KEY = "model"  # one model per engine


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes) if max_bytes > 0 else None
        self.lookups = 0
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self._lru is not None

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    def fetch(self, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the longest usable cached prefix of `tokens`, and its length.

        The length is always < len(tokens): at least the last token is left to compute.
        """
        if self._lru is None:
            return None, 0
        self.lookups += 1
        cache, rest = self._lru.fetch_nearest_cache(_MODEL_KEY, list(tokens))
        if cache is None:
            return None, 0
        cached = len(tokens) - len(rest)
        if cached == len(tokens):  # exact hit: give back the last token to compute
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            cached -= 1
        if cached < MIN_REUSE_TOKENS:
            return None, 0
        self.hits += 1
        return cache, cached

    def shed(self, nbytes: int) -> int:
        """Drop least recently used entries until `nbytes` are freed or none is left; bytes freed."""
        if self._lru is None or nbytes <= 0:
            return 0
        before = self._lru.nbytes
        self._lru.trim_to(n_bytes=max(before - nbytes, 0))
        return before - self._lru.nbytes

    def store(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep `cache` (the KV state of exactly `tokens`), evicting to stay within the caps."""
        if self._lru is None or len(tokens) < MIN_REUSE_TOKENS:
            return
        # Materialize (asynchronously, with the next step): an unevaluated slice would pin
        # the whole batch buffer it came from, behind the byte count.
        mx.async_eval([c.state for c in cache])
        if sum(c.nbytes for c in cache) > self.max_bytes:
            return  # would evict everything and still not fit
        self._lru.insert_cache(_MODEL_KEY, list(tokens), cache)
