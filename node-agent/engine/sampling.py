"""Token samplers per request: temperature, top-p, top-k, min-p, and seeded streams;
logits processors: presence, frequency and repetition penalties, logit bias.

`SamplerFactory.sampler(params)` returns a function from log-probabilities to tokens,
built from mlx-lm's own filters (`mlx_lm.sample_utils`). Requests without a seed and
with equal parameters share one sampler object: mlx-lm's batch generator then samples
all of them in one batched call. A request with a seed gets its own sampler holding
its own PRNG key, split once per token, so its tokens depend on the seed alone, never
on which other requests share the batch or on the global random state.

The filters are mlx-lm's (`mlx_lm.sample_utils`) rewritten so that they compile once:
mlx-lm's `mx.compile`d filters and draw bake each float argument into the compiled graph
and are compiled per shape, so every new temperature, top-p or min-p value and every
new batch width is a new compile while serving (measured on the CPU, a fresh process:
1.2 s for a first temp=0.7/top_p=0.95 call at width 1 while temp=1/top_p=0.9 was in the
kernel cache). Here the parameters are arrays and the filters are compiled shapeless:
one compile per filter and dtype, whatever the values and widths, which the engine pays
before ready (`warm_samplers`). The draw (`mx.random.categorical`, whose random bits
cannot be compiled shapeless) is not compiled: plain ops, nothing to compile.
`compiles()` counts the filters' compiles (traces). top-k keeps ties with the k-th
log-probability (mlx-lm keeps exactly k).

Penalties and biases are mlx-lm's logits processors (`make_logits_processors`); they
look at the last 20 tokens of the sequence, prompt included, as mlx-lm's do.

Runs on the engine thread (imports MLX).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)
from mlxpool.agent.engine.interface import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_MAX_SHARED = 256  # distinct unseeded parameter sets kept


_traces = 0
_dtypes: set[mx.Dtype] = set()
"""The log-probability dtypes the samplers were called with (the model's: compiles are per dtype too)."""


def compiles() -> int:
    """How many times one of this module's compiled filters was traced (= compiled) so far."""
    return _traces


def _traced() -> None:
    global _traces
    _traces += 1  # runs only while mx.compile traces the function: once per new input shape


_ZERO = mx.array([[0]], dtype=mx.int32)  # data, not an op: usable from any thread


@partial(mx.compile, shapeless=True)
def _top_p(logprobs: mx.array, top_p: mx.array, zero: mx.array) -> mx.array:
    """mlx_lm.sample_utils.apply_top_p, `top_p` an array (`zero`: index 0, as an array: slices
    cannot be compiled shapeless)."""
    _traced()
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs.astype(mx.float32))
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mx.take_along_axis(mass_above, zero, axis=-1) + mx.take_along_axis(sorted_probs, zero, axis=-1)
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


@partial(mx.compile, shapeless=True)
def _min_p(logprobs: mx.array, log_min_p: mx.array) -> mx.array:
    """mlx_lm.sample_utils.apply_min_p (one token kept at least), `log(min_p)` an array."""
    _traced()
    scaled_min_p = mx.max(logprobs, axis=-1, keepdims=True) + log_min_p.astype(logprobs.dtype)
    return mx.where(logprobs < scaled_min_p, -float("inf"), logprobs)


@partial(mx.compile, shapeless=True)
def _top_k(logprobs: mx.array, drop: mx.array) -> mx.array:
    """Keep the k most likely tokens (`drop` = [[vocab - k]], an array): those at or above the
    k-th largest log-probability. Ties with it are kept too (mlx-lm's argpartition keeps
    exactly k, and compiles once per k and width)."""
    _traced()
    kth = mx.take_along_axis(mx.sort(logprobs, axis=-1), drop, axis=-1)
    return mx.where(logprobs < kth, -float("inf"), logprobs)


def _filters(vocab_size: int, top_p: float, top_k: int, min_p: float) -> list[Callable[[mx.array], mx.array]]:
    """The filters of mlx_lm's `make_sampler`, in its order (top-p, min-p, top-k)."""
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1.0:
        filters.append(partial(_top_p, top_p=mx.array(top_p, dtype=mx.float32), zero=_ZERO))
    if min_p != 0.0:
        filters.append(partial(_min_p, log_min_p=mx.array(math.log(min_p), dtype=mx.float32)))
    if 0 < top_k < vocab_size:
        filters.append(partial(_top_k, drop=mx.array([[vocab_size - top_k]], dtype=mx.int32)))
    return filters


class _Sampler:
    """Unseeded sampling: the filters, then a draw from MLX's global random state."""

    def __init__(self, vocab_size: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0) -> None:
        self._filters = _filters(vocab_size, top_p, top_k, min_p)
        self._inverse_temperature = 1.0 / temperature

    def __call__(self, logprobs: mx.array) -> mx.array:
        _dtypes.add(logprobs.dtype)
        for apply in self._filters:
            logprobs = apply(logprobs)
        return mx.random.categorical(logprobs * self._inverse_temperature)


def warm_samplers(vocab_size: int, widths: list[int]) -> int:
    """Run every filter and draw on batches of these widths (zeros((w, vocab)) of each dtype the
    samplers have seen so far, float32 if none): compiles, and on the CPU the kernels' JIT; the
    compiles it took."""
    before = compiles()
    everything = _Sampler(vocab_size, 1.0, top_p=0.9, top_k=max(1, min(40, vocab_size - 1)), min_p=0.05)
    seeded = SeededSampler(0, 1.0, vocab_size=vocab_size)
    for dtype in sorted(_dtypes or {mx.float32}, key=str):
        for width in widths:
            logprobs = mx.zeros((width, vocab_size), dtype=dtype)
            mx.eval(everything(logprobs), seeded(logprobs))
    return compiles() - before


class SamplerFactory:
    def __init__(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        self._shared: dict[tuple[float, float, int, float], Sampler] = {}

    def sampler(self, params: SamplingParams) -> Sampler:
        if params.greedy:
            return greedy_sampler
        top_k = params.top_k if 0 < params.top_k < self._vocab_size else 0  # k >= vocab keeps everything
        if params.seed is not None:
            return SeededSampler(params.seed, params.temperature, params.top_p, top_k, params.min_p, self._vocab_size)
        key = (params.temperature, params.top_p, top_k, params.min_p)
        sampler = self._shared.get(key)
        if sampler is None:
            if len(self._shared) >= _MAX_SHARED:
                self._shared.clear()
            sampler = self._shared[key] = _Sampler(self._vocab_size, params.temperature, params.top_p, top_k,
                                                   params.min_p)
        return sampler


class SeededSampler:
    """A sampler with its own random stream: the filters of `make_sampler`, then a keyed draw.

    `rewind()` takes back the last draw's key, so a sequence paused after mlx-lm already
    sampled its next token (one step ahead) draws that token again, identically, when
    it resumes (`generation`'s preemption).
    """

    def __init__(self, seed: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, vocab_size: int = 1 << 30) -> None:
        self._filters = _filters(vocab_size, top_p, top_k, min_p)
        self._key = mx.random.key(seed % (1 << 64))
        self._previous: mx.array | None = None
        self._inverse_temperature = 1.0 / temperature

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._previous = self._key
        self._key, draw = mx.random.split(self._key)
        _dtypes.add(logprobs.dtype)
        for apply in self._filters:
            logprobs = apply(logprobs)
        return mx.random.categorical(logprobs * self._inverse_temperature, key=draw)

    def rewind(self) -> None:
        """Undo the last draw (once): the next call draws with the same key again."""
        if self._previous is not None:
            self._key, self._previous = self._previous, None


def seeded_sampler(seed: int, temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   vocab_size: int = 1 << 30) -> Sampler:
    """A `SeededSampler` (kept as a function for callers that want a plain `Sampler`)."""
    return SeededSampler(seed, temperature, top_p, top_k, min_p, vocab_size)


def logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The request's penalties and biases as mlx-lm logits processors (none: an empty list)."""
    if not params.penalized:
        return []
    return make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )
