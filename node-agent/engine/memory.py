"""The node's memory books: what the weights, the KV cache and the prefix cache hold, and
whether a new request's KV fits (mlx_lm.server grows until Metal aborts; we refuse first).

The books are node-wide (every engine of the agent shares one; engine threads call them,
so they lock). They count, in bytes:
- the weights of every loaded model (`add_weights` at load, `remove_weights` at unload); a
  tensor several models hold as one array (`engine.tensorshare`) once, under its digest,
  for as long as any of them holds it;
- the projected KV of every admitted sequence, reserved at admission and released when it
  ends: (prompt + max_tokens) tokens at the model's KV bytes per token, rounded up to
  mlx-lm's KV allocation step (its caches grow 256 tokens at a time);
- each engine's prefix cache, as the engine reports it (`set_prefix_bytes`).
The KV budget is the node's capacity (physical memory, or the cgroup's memory.max when
lower) less the OS headroom and the weights. `decide` is the admission rule:
- projected KV larger than the whole budget: refused, it can never fit;
- under OS pressure (available memory below the threshold): a long request is refused;
- it fits: admitted; it fits once the prefix cache sheds: shed, then admitted;
- otherwise it waits for running sequences to end (the engine bounds the wait).
Implements `engine.memorybudget.MemoryBudget` (can_hold/reserve/release/reserved_bytes).

Pure: no MLX, no OS calls (the caller passes the OS's available bytes), no clock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

KV_STEP_TOKENS = 256
"""mlx-lm's KVCache grows by this many tokens at a time (its `step`)."""


class Verdict(StrEnum):
    ADMIT = "admit"
    SHED_THEN_ADMIT = "shed_then_admit"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    shortfall_bytes: int = 0
    """Bytes missing (REFUSE, WAIT) or to shed from the prefix cache (SHED_THEN_ADMIT)."""
    reason: str = ""


@dataclass(frozen=True)
class MemoryPolicy:
    capacity_bytes: int
    """What the agent may use in all (physical memory, or the cgroup's limit when lower)."""
    headroom_bytes: int
    """Left to the OS and everything else; never budgeted."""
    pressure_free_bytes: int
    """Below this much available memory (as the OS reports it) the node is under pressure."""
    long_request_bytes: int
    """Under pressure, a request projecting more KV than this is refused."""

    def __post_init__(self) -> None:
        if min(self.capacity_bytes, self.headroom_bytes, self.pressure_free_bytes, self.long_request_bytes) < 0:
            raise ValueError("memory policy sizes must be >= 0")


def kv_bytes_per_token(config: dict[str, Any], itemsize: int) -> int:
    """KV cache bytes one token costs (keys and values of every layer) for an mlx-lm model config."""
    text = config.get("text_config") or {}

    def get(key: str) -> Any:
        return config.get(key, text.get(key))

    layers = int(get("num_hidden_layers") or 0)
    heads = int(get("num_attention_heads") or 0)
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or (int(get("hidden_size") or 0) // heads if heads else 0))
    if min(layers, kv_heads, head_dim, itemsize) <= 0:
        raise ValueError("model config lacks num_hidden_layers / attention heads / hidden_size for KV sizing")
    return 2 * layers * kv_heads * head_dim * itemsize


def projected_kv_bytes(prompt_tokens: int, max_tokens: int, bytes_per_token: int) -> int:
    """KV a sequence reaches at its longest, in mlx-lm's allocation steps."""
    tokens = max(prompt_tokens + max_tokens, 1)
    return math.ceil(tokens / KV_STEP_TOKENS) * KV_STEP_TOKENS * bytes_per_token


@dataclass(frozen=True)
class PrefillShape:
    """What a prompt's prefill holds besides its KV, by the model's config."""

    heads: int
    vocab: int
    intermediate: int
    itemsize: int


def prefill_shape(config: dict[str, Any], itemsize: int) -> PrefillShape | None:
    """None when the config does not say (then no prefill scratch is counted)."""
    text = config.get("text_config") or {}

    def get(key: str) -> int:
        return int(config.get(key, text.get(key)) or 0)

    heads, vocab, hidden = get("num_attention_heads"), get("vocab_size"), get("hidden_size")
    intermediate = get("intermediate_size") or 4 * hidden
    if min(heads, vocab, intermediate, itemsize) <= 0:
        return None
    return PrefillShape(heads, vocab, intermediate, itemsize)


def prefill_scratch_bytes(prompt_tokens: int, shape: PrefillShape | None, step: int) -> int:
    """Transient bytes one prompt's prefill holds at its peak besides its KV: the attention
    scores of a chunk against every key so far (heads x chunk x keys in float32: MLX's CPU
    attention materializes them), the chunk's logits and its MLP activations. A chunk is
    padded to a power of two (the engine's prefill buckets), at most `step` tokens.

    Measured on the bench model (8 heads, vocab 5,113, CPU): one 1,600-token prefill peaked
    at 163 MiB over its weights and KV; this says 192 MiB (padded to 2,048)."""
    if shape is None or prompt_tokens <= 0:
        return 0
    chunk = min(max(step, 1), 1 << (prompt_tokens - 1).bit_length())
    keys = max(prompt_tokens, chunk)
    return chunk * (shape.heads * keys * 4 + shape.vocab * 4 + 3 * shape.intermediate * shape.itemsize)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class MemoryBooks:
    """The node's books; implements `engine.memorybudget.MemoryBudget`. Thread-safe."""

    def __init__(self, policy: MemoryPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._weights: dict[str, int] = {}
        self._shared: dict[str, tuple[int, set[str]]] = {}
        """Digest -> (bytes, the models holding that one array)."""
        self._reserved: dict[str, int] = {}
        self._prefix: dict[str, int] = {}
        self._reserved_total = 0

    # ---- the books ----

    def add_weights(self, model: str, nbytes: int, shared: Mapping[str, int] | None = None) -> None:
        """`nbytes`: the model's weights outside the tensor share; `shared`: digest -> bytes of
        its tensors in the share (each counted once, whichever models hold it)."""
        with self._lock:
            self._weights[model] = max(nbytes, 0)
            for digest, size in (shared or {}).items():
                _, holders = self._shared.setdefault(digest, (max(size, 0), set()))
                holders.add(model)

    def remove_weights(self, model: str) -> None:
        with self._lock:
            self._weights.pop(model, None)
            self._prefix.pop(model, None)
            for digest, (_, holders) in list(self._shared.items()):
                holders.discard(model)
                if not holders:
                    del self._shared[digest]

    def set_prefix_bytes(self, model: str, nbytes: int) -> None:
        with self._lock:
            self._prefix[model] = max(nbytes, 0)

    @property
    def weights_bytes(self) -> int:
        return sum(self._weights.values()) + sum(size for size, _ in list(self._shared.values()))

    @property
    def shared_bytes_saved(self) -> int:
        """Weight bytes not counted twice: each shared tensor once per extra model holding it."""
        with self._lock:
            return sum(size * (len(holders) - 1) for size, holders in self._shared.values())

    @property
    def prefix_bytes(self) -> int:
        return sum(self._prefix.values())

    @property
    def kv_budget_bytes(self) -> int:
        """What KV (reserved and prefix cache) may take: capacity less headroom and weights."""
        return max(self.policy.capacity_bytes - self.policy.headroom_bytes - self.weights_bytes, 0)

    # ---- MemoryBudget ----

    def can_hold(self, nbytes: int) -> bool:
        with self._lock:
            return self._room() >= max(nbytes, 0)

    def reserve(self, key: str, nbytes: int) -> bool:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            previous = self._reserved.get(key, 0)
            if self._room() + previous < nbytes:
                return False
            self._reserved[key] = nbytes
            self._reserved_total += nbytes - previous
            return True

    def shrink(self, key: str, nbytes: int) -> None:
        """Lower a reservation still held under `key` to `nbytes` (none held, or already
        lower: nothing changes; never grows one)."""
        with self._lock:
            previous = self._reserved.get(key)
            if previous is None or nbytes >= previous:
                return
            self._reserved[key] = max(nbytes, 0)
            self._reserved_total -= previous - max(nbytes, 0)

    def release(self, key: str) -> int:
        with self._lock:
            nbytes = self._reserved.pop(key, 0)
            self._reserved_total -= nbytes
            return nbytes

    @property
    def reserved_bytes(self) -> int:
        return self._reserved_total

    # ---- admission ----

    def under_pressure(self, available_bytes: int | None) -> bool:
        return available_bytes is not None and available_bytes < self.policy.pressure_free_bytes

    def decide(self, nbytes: int, available_bytes: int | None) -> Decision:
        """Whether a sequence projecting `nbytes` of KV may start now (nothing is taken)."""
        with self._lock:
            budget = self.kv_budget_bytes
            if nbytes > budget:
                return Decision(Verdict.REFUSE, nbytes - budget,
                                f"its projected KV cache ({_mib(nbytes)}) exceeds this node's whole KV budget "
                                f"({_mib(budget)}: {_mib(self.policy.capacity_bytes)} less "
                                f"{_mib(self.policy.headroom_bytes)} headroom and {_mib(self.weights_bytes)} "
                                "of weights); lower max_tokens or shorten the prompt")
            if self.under_pressure(available_bytes) and nbytes > self.policy.long_request_bytes:
                assert available_bytes is not None
                return Decision(Verdict.REFUSE, self.policy.pressure_free_bytes - available_bytes,
                                f"the node is under memory pressure ({_mib(available_bytes)} available, below "
                                f"{_mib(self.policy.pressure_free_bytes)}) and its projected KV cache "
                                f"({_mib(nbytes)}) is over the {_mib(self.policy.long_request_bytes)} "
                                "allowed then; retry later or lower max_tokens")
            room = self._room()
            if nbytes <= room:
                return Decision(Verdict.ADMIT)
            missing = nbytes - room
            if missing <= self.prefix_bytes:
                return Decision(Verdict.SHED_THEN_ADMIT, missing, "prefix cache shed to make room")
            return Decision(Verdict.WAIT, missing - self.prefix_bytes,
                            f"its projected KV cache ({_mib(nbytes)}) is {_mib(missing - self.prefix_bytes)} "
                            f"more than is free ({_mib(room + self.prefix_bytes)} of a {_mib(budget)} KV budget, "
                            f"{_mib(self._reserved_total)} held by running requests)")

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"capacity_bytes": self.policy.capacity_bytes, "headroom_bytes": self.policy.headroom_bytes,
                    "weights_bytes": self.weights_bytes, "kv_budget_bytes": self.kv_budget_bytes,
                    "kv_reserved_bytes": self._reserved_total, "prefix_cache_bytes": self.prefix_bytes}

    def _room(self) -> int:
        return self.kv_budget_bytes - self._reserved_total - self.prefix_bytes
