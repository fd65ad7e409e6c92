"""Dense copies of a quantized model's linear layers, used for steps wide enough to gain.

Why: MLX's CUDA 4-bit matmul costs grow with the rows of a step. Measured on an H200
(8B-shaped 4-bit model, MLX 0.32.4): a decode step took 7.8 ms at width 1 and 104 ms at
width 32, while a dense GEMM costs about the same at every width up to a few hundred rows.
vLLM makes the same trade for AWQ (dequantize, then GEMM, from 256 tokens). Where the device
has memory to spare, the agent keeps a dense copy (the scales' dtype, e.g. bf16) of each
quantized linear and computes a step from it once the step has `min_rows` rows or more;
narrower steps stay on the quantized kernel. `min_rows` is measured on the model itself at
warm-up (`choose_min_rows`): the copies are dropped when they win at no width.

Not on Metal or the CPU by default: their quantized kernels do not show this cost, and their
memory is the host's. The copies count in the model's memory bytes.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxpool.agent.engine.interface import AcceleratorKind, DenseCopyPolicy

log = logging.getLogger(__name__)

MEASURED_WIDTHS = (1, 2, 4, 8, 16, 32)
AUTO_DEVICE_FRACTION = 0.25
"""`auto` keeps copies only while they take at most this share of the device's memory."""

NEVER = math.inf


def wanted(policy: DenseCopyPolicy, kind: AcceleratorKind, device_memory: int | None, dense_bytes: int) -> bool:
    """Whether to make the copies (pure: the policy, the device, what they would cost)."""
    if dense_bytes <= 0 or policy is DenseCopyPolicy.OFF:
        return False
    if policy is DenseCopyPolicy.ON:
        return True
    return kind is AcceleratorKind.CUDA and device_memory is not None and (
        dense_bytes <= device_memory * AUTO_DEVICE_FRACTION)


def choose_min_rows(timings: Mapping[int, tuple[float, float]]) -> float:
    """The narrowest measured width from which the dense path is faster at every wider
    measured width (`timings`: width -> (quantized seconds, dense seconds)); NEVER if it does
    not win at the widest. Monotone on purpose: one threshold, no islands of noise."""
    best = NEVER
    for width in sorted(timings, reverse=True):
        quantized, dense = timings[width]
        if dense >= quantized:
            break
        best = width
    return best


@dataclass
class RowSwitch:
    """Shared by every layer of one model: steps of at least `min_rows` rows go dense."""

    min_rows: float = NEVER


class DenseBackedLinear(nn.QuantizedLinear):
    """A quantized linear that also holds its dense weight (`_dense`, not a parameter, so
    parameter walks, pinning and identity never see it)."""

    _dense: mx.array
    _switch: RowSwitch

    def __call__(self, x: mx.array) -> mx.array:
        if x.size >= self._switch.min_rows * x.shape[-1]:
            y = x @ self._dense.T
            if "bias" in self:
                y = y + self["bias"]
            return y
        return super().__call__(x)


def _quantized_linears(model: nn.Module) -> Iterator[nn.QuantizedLinear]:
    for _, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear) and getattr(module, "mode", "affine") == "affine":
            yield module


def dense_bytes(model: nn.Module) -> int:
    """What the copies of `model` would take."""
    total = 0
    for layer in _quantized_linears(model):
        out_features = layer["weight"].shape[0]
        in_features = layer["weight"].shape[1] * 32 // layer.bits
        total += out_features * in_features * layer["scales"].dtype.size
    return total


@dataclass
class DenseCopies:
    """The copies of one model: its switch, their bytes and layers."""

    switch: RowSwitch
    layers: list[DenseBackedLinear]
    bytes: int

    def drop(self) -> None:
        """Back to plain quantized layers; the copies' memory goes with the last reference."""
        for layer in self.layers:
            object.__delattr__(layer, "_dense")
            object.__delattr__(layer, "_switch")
            layer.__class__ = nn.QuantizedLinear  # type: ignore[assignment]
        self.layers = []
        self.bytes = 0
        self.switch.min_rows = NEVER


def attach(model: nn.Module) -> DenseCopies:
    """Make the copies (one layer evaluated at a time, so the transient peak is one layer)."""
    switch = RowSwitch()
    layers: list[DenseBackedLinear] = []
    total = 0
    for layer in list(_quantized_linears(model)):
        dense = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"),
                              group_size=layer.group_size, bits=layer.bits)
        mx.eval(dense)
        object.__setattr__(layer, "_dense", dense)
        object.__setattr__(layer, "_switch", switch)
        layer.__class__ = DenseBackedLinear
        layers.append(layer)  # type: ignore[arg-type]
        total += dense.nbytes
    return DenseCopies(switch, layers, total)


def measure(copies: DenseCopies, step: Callable[[int], Callable[[], mx.array]], widths: list[int],
            repeats: int = 7) -> dict[int, tuple[float, float]]:
    """Median seconds per step at each width, quantized then dense (`step(width)` returns one
    step's function on a fresh cache); two runs first so that compiling and the GEMM library's
    first plan are not counted; each step synchronized (the median shrugs off a stray stall)."""
    timings: dict[int, tuple[float, float]] = {}
    saved = copies.switch.min_rows
    try:
        for width in widths:
            pair = []
            for min_rows in (NEVER, 0):
                copies.switch.min_rows = min_rows
                run = step(width)
                for _ in range(2):
                    mx.eval(run())
                mx.synchronize()
                samples = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    mx.eval(run())
                    mx.synchronize()
                    samples.append(time.perf_counter() - started)
                pair.append(statistics.median(samples))
            timings[width] = (pair[0], pair[1])
    finally:
        copies.switch.min_rows = saved
    return timings


def write_record(path: Path, min_rows: float, timings: Mapping[int, tuple[float, float]]) -> None:
    """Keep a measured crossover for the next start (best effort: a read-only cache only costs
    the next start its measurement)."""
    body = {"from_rows": None if min_rows == NEVER else int(min_rows),
            "timings_ms": {str(w): [round(q * 1e3, 3), round(d * 1e3, 3)] for w, (q, d) in timings.items()}}
    try:
        path.write_text(json.dumps(body))
    except OSError as exc:
        log.warning("dense crossover not kept path=%s error=%s", path, exc)


def read_record(path: Path) -> float | None:
    """The crossover `write_record` kept (NEVER for "no width"), or None: none, or unreadable."""
    try:
        body = json.loads(path.read_text())
        rows = body["from_rows"]
        return NEVER if rows is None else float(int(rows))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def decode_step(model: nn.Module, context: int = 16) -> Callable[[int], Callable[[], mx.array]]:
    """`measure`'s step: a `width`-wide decode step of `model` after a `context`-token prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    def make(width: int) -> Callable[[], mx.array]:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.zeros((width, context), mx.int32), cache=cache))
        token = mx.zeros((width, 1), mx.int32)
        # Each call appends one position: a few calls stay far below any context limit.
        return lambda: model(token, cache=cache)

    return make
