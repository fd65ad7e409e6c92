"""What the engine knows of its own speed, learned online: the scheduler's predictions.

Three measurements, each an exponentially weighted moving average so the model follows
a machine whose load changes (other processes, thermal limits, a second model):
- prefill speed, prompt tokens per second, twice: per prompt (admission to prefilled,
  what one prompt's first token waits) and in aggregate (prompt tokens processed per
  second of the steps that processed them, whatever the number of prompts in them: what
  a queue of prompts drains at, since prefill is serial);
- decode step time by batch size, in power-of-two buckets (a step of 32 sequences is
  slower than one of 1; buckets never seen are interpolated between the nearest seen
  ones, or scaled linearly past them), twice: steps that only decoded (what a step of
  that width costs), and every step that produced tokens, prompts processed in it
  included (what a running sequence really waits per token while others' prompts are
  prefilled: under a stream of arrivals most steps carry a prefill, and measured on
  bench.scheduling's overload they took 0.5 s against 0.07 s for decode-only ones, so
  durations predicted from decode-only steps were several times too short);
- how many tokens requests really produce, as a fraction of their `max_tokens` (most
  stop early), so a duration is not predicted from `max_tokens` alone.

From these: a prompt's prefill time, a request's duration and a running sequence's
remaining time (both from the busy step time). Before the first measurement the priors below answer; they are
deliberately slow guesses (a prediction too slow refuses early, one too fast
promises what the machine cannot keep, and the first few steps correct it).

Pure: no MLX, no clock of its own (callers pass measured seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR_PREFILL_TPS = 400.0
PRIOR_STEP_S = 0.05
PRIOR_PRODUCED_FRACTION = 1.0
ALPHA = 0.2
"""Weight of a new measurement in the moving averages."""
MAX_BUCKET = 1 << 12


def _bucket(batch: int) -> int:
    """The power-of-two bucket of a batch size (1, 2, 4, ...)."""
    return 1 << max(0, math.ceil(math.log2(max(1, min(batch, MAX_BUCKET)))))


@dataclass
class SpeedModel:
    prefill_tps: float | None = None
    prefill_work_tps: float | None = None
    """Aggregate prompt tokens per second over the steps that processed prompts."""
    produced_fraction: float | None = None
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self._steps: dict[int, float] = {}
        """Decode-only step seconds by bucket."""
        self._busy: dict[int, float] = {}
        """Seconds of every step that produced tokens (prefill work in it included), by bucket."""

    # ---- measurements ----

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        tps = tokens / seconds
        self.prefill_tps = tps if self.prefill_tps is None else (1 - self.alpha) * self.prefill_tps + self.alpha * tps

    def observe_prefill_work(self, tokens: int, seconds: float) -> None:
        """A step processed `tokens` prompt tokens (of any number of prompts) in `seconds`."""
        if tokens <= 0 or seconds <= 0:
            return
        self.prefill_work_tps = self._average(self.prefill_work_tps, tokens / seconds)

    def observe_step(self, batch: int, seconds: float, *, decode_only: bool = True) -> None:
        """A step that produced tokens for `batch` sequences took `seconds`; `decode_only`: no
        prompt was processed in it."""
        if batch <= 0 or seconds <= 0:
            return
        key = _bucket(batch)
        if decode_only:
            self._steps[key] = self._average(self._steps.get(key), seconds)
        self._busy[key] = self._average(self._busy.get(key), seconds)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_finished(self, produced: int, max_tokens: int) -> None:
        """A request ended after `produced` of its `max_tokens` tokens (not cancelled ones: they say nothing)."""
        if max_tokens <= 0 or produced <= 0:
            return
        fraction = min(1.0, produced / max_tokens)
        old = self.produced_fraction
        self.produced_fraction = fraction if old is None else (1 - self.alpha) * old + self.alpha * fraction

    # ---- predictions ----

    def prefill_seconds(self, tokens: int) -> float:
        return max(0, tokens) / (self.prefill_tps or PRIOR_PREFILL_TPS)

    def serial_prefill_seconds(self, tokens: int) -> float:
        """The share of the serial prefill work `tokens` prompt tokens take: what every prompt
        behind them in the queue waits for them (the per-prompt rate until the aggregate one
        is measured)."""
        return max(0, tokens) / (self.prefill_work_tps or self.prefill_tps or PRIOR_PREFILL_TPS)

    def step_seconds(self, batch: int) -> float:
        """Predicted time of one decode-only step with `batch` sequences."""
        return _by_batch(self._steps, batch)

    def busy_step_seconds(self, batch: int) -> float:
        """Predicted time between two tokens of a sequence in a batch of `batch`, with the
        prefills that share the steps (the decode-only time when nothing else was measured)."""
        return _by_batch(self._busy, batch) if self._busy else self.step_seconds(batch)

    def produced_tokens(self, max_tokens: int) -> float:
        """Tokens a request with this `max_tokens` is expected to produce (at least one)."""
        fraction = PRIOR_PRODUCED_FRACTION if self.produced_fraction is None else self.produced_fraction
        return max(1.0, fraction * max_tokens)

    def duration_seconds(self, prompt_tokens: int, max_tokens: int, batch: int) -> float:
        """Predicted time from admission to the last token, sharing the batch with `batch` sequences."""
        return self.prefill_seconds(prompt_tokens) + self.produced_tokens(max_tokens) * self.busy_step_seconds(batch)

    def remaining_seconds(self, generated: int, max_tokens: int, batch: int) -> float:
        """Predicted time a running sequence still needs (at least one step)."""
        expected = min(self.produced_tokens(max_tokens), float(max_tokens))
        # Past what most requests produce: assume it runs halfway to its max_tokens.
        remaining = expected - generated if generated < expected else (max_tokens - generated) / 2
        return max(1.0, remaining) * self.busy_step_seconds(batch)


def _by_batch(steps: dict[int, float], batch: int) -> float:
    """A step time for `batch` from the buckets measured: its own, else interpolated, else scaled."""
    if not steps:
        return PRIOR_STEP_S
    key = _bucket(batch)
    if key in steps:
        return steps[key]
    below = [k for k in steps if k < key]
    above = [k for k in steps if k > key]
    if below and above:
        lo, hi = max(below), min(above)
        t = (math.log2(key) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
        return steps[lo] + t * (steps[hi] - steps[lo])
    nearest = max(below) if below else min(above)
    # Past what was seen: per-sequence cost stays, so scale by the batch (never below what was seen).
    scaled = steps[nearest] * key / nearest
    return max(scaled, steps[nearest]) if below else min(scaled, steps[nearest])
