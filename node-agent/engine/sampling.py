"""Token samplers per request: temperature, top-p, top-k, min-p, and seeded streams;
logits processors: presence, frequency and repetition penalties, logit bias.

`SamplerFactory.sampler(params)` returns a function from log-probabilities to tokens,
built from mlx-lm's own filters (`mlx_lm.sample_utils`). Requests without a seed and
with equal parameters share one sampler object: mlx-lm's batch generator then samples
all of them in one batched call. A request with a seed gets its own sampler holding
its own PRNG key, split once per token, so its tokens depend on the seed alone, never
on which other requests share the batch or on the global random state.

Penalties and biases are mlx-lm's logits processors (`make_logits_processors`); they
look at the last 20 tokens of the sequence, prompt included, as mlx-lm's do.

Runs on the engine thread (imports MLX).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)
from mlxpool.agent.engine.interface import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_MAX_SHARED = 256  # distinct unseeded parameter sets kept


class SamplerFactory:
    def __init__(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        self._shared: dict[tuple[float, float, int, float], Sampler] = {}

    def sampler(self, params: SamplingParams) -> Sampler:
        if params.greedy:
            return greedy_sampler
        top_k = params.top_k if 0 < params.top_k < self._vocab_size else 0  # k >= vocab keeps everything
        if params.seed is not None:
            return seeded_sampler(params.seed, params.temperature, params.top_p, top_k, params.min_p)
        key = (params.temperature, params.top_p, top_k, params.min_p)
        sampler = self._shared.get(key)
        if sampler is None:
            if len(self._shared) >= _MAX_SHARED:
                self._shared.clear()
            sampler = self._shared[key] = make_sampler(
                temp=params.temperature, top_p=params.top_p, top_k=top_k, min_p=params.min_p,
            )
        return sampler


class SeededSampler:
    """A sampler with its own random stream: the filters of `make_sampler`, then a keyed draw.

    `rewind()` takes back the last draw's key, so a sequence paused after mlx-lm already
    sampled its next token (one step ahead) draws that token again, identically, when
    it resumes (`generation`'s preemption).
    """

    def __init__(self, seed: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0) -> None:
        filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1.0:  # the same order as mlx_lm.sample_utils.make_sampler
            filters.append(partial(apply_top_p, top_p=top_p))
        if min_p != 0.0:
            filters.append(partial(apply_min_p, min_p=min_p))
        if top_k > 0:
            filters.append(partial(apply_top_k, top_k=top_k))
        self._filters = filters
        self._key = mx.random.key(seed % (1 << 64))
        self._previous: mx.array | None = None
        self._inverse_temperature = 1.0 / temperature

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._previous = self._key
        self._key, draw = mx.random.split(self._key)
        for apply in self._filters:
            logprobs = apply(logprobs)
        return mx.random.categorical(logprobs * self._inverse_temperature, key=draw)

    def rewind(self) -> None:
        """Undo the last draw (once): the next call draws with the same key again."""
        if self._previous is not None:
            self._key, self._previous = self._previous, None


def seeded_sampler(seed: int, temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Sampler:
    """A `SeededSampler` (kept as a function for callers that want a plain `Sampler`)."""
    return SeededSampler(seed, temperature, top_p, top_k, min_p)


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
