"""Which shapes the engine's forward passes take, and which of them are warm.

MLX compiles kernels on first use of a shape (on CUDA through NVRTC: seconds each, the
first 8-wide burst on an H200 stalled ~30 s; Metal and the CPU compile too, for less).
A shape compiled while users wait freezes every stream of the batch, so the engine
runs each shape it can produce once before `/ready`. The set is kept small on
purpose, and known:

- decode: one step per batch width, 1 .. decode concurrency. All widths are warmed
  (a ladder of sequences ending one step apart walks them all in about one pass), so
  nothing is padded: a padded row costs a whole sequence's compute on every step of a
  request's life, a compile is paid once, before ready.
- prefill: chunks of at most `prefill_step_size` tokens, bucketed by powers of two
  (16, 32, .. the step size): one prompt of each bucket's length, and groups of
  2, 4, .. prefill concurrency short prompts.
- samplers: greedy and temperature sampling in the ladders; then the engine runs every
  filter (top-p, min-p, top-k) and draw on every decode width (`sampling.warm_samplers`;
  the filters compile once, whatever the values: see `engine.sampling`).
- On the CPU (`cpu=True`) nothing of the model is compiled per shape: matmuls are BLAS,
  the other kernels are fixed or `mx.compile(shapeless=True)`d (mlx-lm's activations),
  and their JIT depends on the number of dimensions and the dtypes, not on the sizes. So
  the CPU plan runs one short ladder (two 16-token prompts prefilled together, then
  widths 2 and 1, at most 2 + 3 tokens) with the temperature sampler (it records the
  model's log-probability dtype for `warm_samplers`; the greedy sampler is a plain
  argmax, nothing to compile), then covers every shape of the plan (`ShapeBook.cover`):
  the full plan would spend seconds of compute on a 0.5 B model (32-wide ladders,
  prompts up to the step size) and compile nothing more. Each run is whole forward
  passes: on a 545 MB model four runs took 2-4 s of a cold start (bench.memory), one
  ladder ~0.5-1 s.

A shape seen after warm-up that was not warmed is counted (`ShapeBook.note` says True
once per shape, so the caller logs it once and counts it). Pure: no MLX here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

MIN_PREFILL_BUCKET = 16
CPU_LADDER_WIDTH = 2
CPU_LADDER_TOKENS = 2
"""Tokens of the CPU ladder's first sequence: prefill + one step at width 2 + one at width 1."""


class ShapeKind(StrEnum):
    DECODE = "decode"
    """One decode step; size = batch width."""
    PREFILL = "prefill"
    """One prompt's prefill chunk; size = its length bucket."""
    PREFILL_GROUP = "prefill_group"
    """Prompts prefilled together; size = the group's size bucket."""


@dataclass(frozen=True, slots=True, order=True)
class Shape:
    kind: ShapeKind
    size: int

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.size}"


def pow2_buckets(low: int, high: int) -> list[int]:
    """Powers of two from `low` up to `high`, and `high` itself (the cap is a bucket too)."""
    buckets, size = [], max(1, low)
    while size < high:
        buckets.append(size)
        size *= 2
    buckets.append(high)
    return buckets


def length_bucket(tokens: int, step_size: int) -> int:
    """The prefill bucket of a prompt of `tokens` tokens (its chunks are at most `step_size`)."""
    chunk = min(max(tokens, 1), step_size)
    for bucket in pow2_buckets(MIN_PREFILL_BUCKET, step_size):
        if chunk <= bucket:
            return bucket
    return step_size


def group_bucket(size: int, prefill_concurrency: int) -> int:
    for bucket in pow2_buckets(1, prefill_concurrency):
        if size <= bucket:
            return bucket
    return prefill_concurrency


@dataclass(frozen=True)
class WarmupRun:
    """One insertion of warm-up sequences: their prompt lengths and tokens to generate."""

    prompt_lengths: tuple[int, ...]
    max_tokens: tuple[int, ...]
    sampler: str
    """'greedy' or 'temperature'."""


@dataclass(frozen=True)
class ShapePlan:
    """The shapes an engine with these bounds produces, and how to warm them."""

    max_running: int
    prefill_concurrency: int
    prefill_step_size: int
    samplers: tuple[str, ...] = ("greedy", "temperature")
    cpu: bool = False
    """The CPU plan: short runs, then every shape covered (the module's docstring)."""

    @property
    def decode_widths(self) -> list[int]:
        return list(range(1, self.max_running + 1))

    @property
    def prefill_lengths(self) -> list[int]:
        return pow2_buckets(MIN_PREFILL_BUCKET, self.prefill_step_size)

    @property
    def prefill_groups(self) -> list[int]:
        return [g for g in pow2_buckets(1, min(self.prefill_concurrency, self.max_running)) if g > 1]

    def shapes(self) -> set[Shape]:
        """Every shape the warm-up covers."""
        return ({Shape(ShapeKind.DECODE, w) for w in self.decode_widths}
                | {Shape(ShapeKind.PREFILL, n) for n in self.prefill_lengths}
                | {Shape(ShapeKind.PREFILL_GROUP, 1)}
                | {Shape(ShapeKind.PREFILL_GROUP, g) for g in self.prefill_groups})

    def runs(self, tokens: int = 2) -> list[WarmupRun]:
        """The warm-up, in order: per sampler a decode ladder (sequence i generates `tokens + i`
        tokens, so the batch narrows by one each step: every width once); then one prompt per
        prefill length bucket; then the prefill groups. On the CPU: one temperature ladder
        of width `CPU_LADDER_WIDTH` of at most `CPU_LADDER_TOKENS` (+ i) tokens."""
        short = MIN_PREFILL_BUCKET
        if self.cpu:
            n, first = min(self.max_running, CPU_LADDER_WIDTH), min(tokens, CPU_LADDER_TOKENS)
            return [WarmupRun((short,) * n, tuple(first + i for i in range(n)), "temperature")]
        n = self.max_running
        runs = [WarmupRun((short,) * n, tuple(tokens + i for i in range(n)), sampler) for sampler in self.samplers]
        runs += [WarmupRun((length,), (tokens,), "greedy") for length in self.prefill_lengths]
        runs += [WarmupRun((short,) * g, (tokens,) * g, "greedy") for g in self.prefill_groups]
        return runs

    def decode_top_up(self, seen: set[Shape]) -> list[WarmupRun]:
        """Runs for the decode widths a ladder missed (a sequence ended early on an EOS token)."""
        widths = self.decode_widths[:CPU_LADDER_WIDTH] if self.cpu else self.decode_widths
        missing = [w for w in widths if Shape(ShapeKind.DECODE, w) not in seen]
        return [WarmupRun((MIN_PREFILL_BUCKET,) * w, (3,) * w, "greedy") for w in missing]

    def prefill_shapes(self, prompt_lengths: list[int]) -> list[Shape]:
        """The prefill shapes of one admission of prompts (uncached tokens) of these lengths."""
        shapes = [Shape(ShapeKind.PREFILL, length_bucket(n, self.prefill_step_size)) for n in prompt_lengths]
        for start in range(0, len(prompt_lengths), self.prefill_concurrency):
            size = min(self.prefill_concurrency, len(prompt_lengths) - start)
            shapes.append(Shape(ShapeKind.PREFILL_GROUP, group_bucket(size, self.prefill_concurrency)))
        return shapes


@dataclass
class ShapeBook:
    """Shapes seen, against the plan: warm-up progress, and unwarmed shapes once each."""

    plan: ShapePlan
    planned: set[Shape] = field(init=False)
    seen: set[Shape] = field(default_factory=set)
    warmed: bool = False
    """Warm-up is over: shapes seen from now on that were not warmed count as unwarmed."""
    unwarmed: set[Shape] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.planned = self.plan.shapes()

    @property
    def progress(self) -> tuple[int, int]:
        """(planned shapes warmed, planned shapes)."""
        return len(self.planned & self.seen), len(self.planned)

    def cover(self) -> None:
        """Count every planned shape as warmed (the CPU plan, once its runs are done)."""
        self.seen |= self.planned

    def note(self, shape: Shape) -> bool:
        """Record a shape; True the first time an unwarmed one appears after warm-up."""
        if shape in self.seen:
            return False
        self.seen.add(shape)
        if self.warmed:
            self.unwarmed.add(shape)
            return True
        return False
