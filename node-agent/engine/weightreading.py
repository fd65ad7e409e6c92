"""A model's safetensors read through the native weight manager into MLX arrays.

Why not `mx.load`: the native path maps every shard, parses the headers in C++ (a
malformed or truncated file fails with the file and byte offset named), pages the next
layers in on a fixed pool of native threads while the current one is copied, and
returns arrays whose buffers we can then lock (`pin`) and inspect (`residency`).
mlx-lm still builds the model; only the bytes' path changes (`loading`).

Copy or zero-copy: MLX's Python API has no way to wrap memory it did not allocate, so
each tensor is copied once, by `mx.array` from a numpy view of the mapping into the MLX
array's own buffer (one pass over the bytes, as `mx.load` makes), on every platform,
and the report says "copy". The mappings are dropped
after the copy, so nothing stays file-backed (`mapped` is 0).

Pinning locks the pages of the loaded arrays themselves (the memory MLX computes from),
critical tensors first, within a byte budget. A refusal by the OS is a warning that
names RLIMIT_MEMLOCK and what was pinned; serving goes on. Runs on the engine thread.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import resource
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import mlx.core as mx
import numpy as np

from mlxpool import _native
from mlxpool.agent.engine.interface import LoadOptions, LoadReport, PinPolicy, WeightResidency

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

DTYPES: dict[str, mx.Dtype] = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
    "U32": mx.uint32, "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64,
    "F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32, "F64": mx.float64, "C64": mx.complex64,
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_REFUSED = (errno.EPERM, errno.ENOMEM, errno.EAGAIN)


def weight_files(directory: Path) -> list[Path]:
    """The shards mlx-lm would read (`model*.safetensors`), in name order."""
    return sorted(directory.glob("model*.safetensors"))


@dataclass(frozen=True)
class _Tensor:
    file: _native.SafetensorsFile
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    nbytes: int


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_groups(names: Iterable[str]) -> list[list[str]]:
    """Names in the order a forward pass reads them: embeddings, layer 0..N-1, the rest."""
    embed: list[str] = []
    layers: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in sorted(names):
        layer = layer_of(name)
        if layer is not None:
            layers.setdefault(layer, []).append(name)
        elif "embed" in name or name.startswith("wte"):
            embed.append(name)
        else:
            rest.append(name)
    groups = [embed] + [layers[k] for k in sorted(layers)] + [rest]
    return [g for g in groups if g]


def is_critical(name: str, last_layer: int | None) -> bool:
    """Touched by every token: embeddings, norms, the output head, the first and last layers."""
    layer = layer_of(name)
    if layer is not None and layer in (0, last_layer):
        return True
    return layer is None or "norm" in name


def pin_order(names: Iterable[str], policy: PinPolicy) -> list[str]:
    """What `policy` pins, critical tensors first (so a budget keeps the most useful)."""
    names = list(names)
    if policy == "none":
        return []
    layers = [x for x in (layer_of(n) for n in names) if x is not None]
    last = max(layers) if layers else None
    ordered = [n for g in layer_groups(names) for n in g]
    critical = [n for n in ordered if is_critical(n, last)]
    if policy == "critical":
        return critical
    chosen = set(critical)
    return critical + [n for n in ordered if n not in chosen]


def read(directory: Path, options: LoadOptions) -> tuple[dict[str, mx.array], LoadReport]:
    """Every tensor of the model's shards as an evaluated MLX array, and how it went."""
    paths = weight_files(directory)
    if not paths:
        raise FileNotFoundError(f"no model*.safetensors in {directory}")
    started = time.perf_counter()
    files = [_native.SafetensorsFile(str(p)) for p in paths]  # ValueError names file and offset
    tensors: dict[str, _Tensor] = {}
    for f in files:
        for index, (name, dtype, shape, begin, nbytes) in enumerate(f.tensors()):
            if name in tensors:
                raise ValueError(f"{f.path}: tensor {name!r} is also in {tensors[name].file.path}")
            if dtype not in DTYPES:
                raise ValueError(f"{f.path}: tensor {name!r} has dtype {dtype}, which MLX cannot hold")
            tensors[name] = _Tensor(f, index, name, dtype, tuple(shape), begin, nbytes)
    groups = layer_groups(tensors)
    prefetcher = _native.Prefetcher(options.prefetch_threads) if options.prefetch_threads > 0 else None
    arrays: dict[str, mx.array] = {}
    try:
        submitted = 0
        for k, group in enumerate(groups):
            # Keep the pool `prefetch_depth` layers ahead of the copy, in layer order.
            ahead = prefetched_before(k, len(groups), options.prefetch_depth) if prefetcher is not None else 0
            while prefetcher is not None and submitted < ahead:
                for name in groups[submitted]:
                    t = tensors[name]
                    prefetcher.submit(t.file, t.begin, t.nbytes)
                submitted += 1
            # One pass over the bytes: MLX copies each tensor from a numpy view of the
            # mapping into its own buffer (no zero-fill first; the pages the pool touched are
            # already mapped).
            fresh = {name: _from_mapping(tensors[name]) for name in group}
            mx.eval(list(fresh.values()))
            arrays.update(fresh)
    finally:
        if prefetcher is not None:
            prefetcher.close()  # joins its threads; drops what is left
    seconds = time.perf_counter() - started
    total = sum(t.nbytes for t in tensors.values())
    report = LoadReport(reader="native", transfer="copy", files=len(files), bytes=total, seconds=seconds,
                        prefetch_threads=options.prefetch_threads, pin_policy=options.pin_policy, pinned_bytes=0)
    return arrays, report


def prefetched_before(k: int, groups: int, depth: int) -> int:
    """How many layer groups the prefetch pool has been given before group `k` is copied:
    `k` itself and `depth` more (`weight_management.prefetch_depth`), never past the last."""
    return min(groups, k + 1 + depth)


# numpy views the mapped bytes; types numpy lacks (bfloat16) are read as same-size
# unsigned integers and viewed as the MLX type without a copy.
_NUMPY: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "uint16", "F32": "float32",
    "F64": "float64", "C64": "complex64",
}


def _from_mapping(t: _Tensor) -> mx.array:
    dtype = np.dtype(_NUMPY[t.dtype])
    count = t.nbytes // dtype.itemsize if dtype.itemsize else 0
    if count * dtype.itemsize != t.nbytes or math.prod(t.shape) != count:
        raise ValueError(f"{t.file.path}: tensor {t.name!r}: {t.nbytes} bytes do not hold shape {list(t.shape)} "
                         f"of {t.dtype}")
    view = np.frombuffer(memoryview(t.file), dtype=dtype, count=count, offset=t.begin).reshape(t.shape)
    array = mx.array(view)
    return array.view(DTYPES[t.dtype]) if array.dtype != DTYPES[t.dtype] else array


class Weights:
    """A loaded model's parameters with their pin set; implements `interface.WeightsView`.

    Holds a memoryview of every parameter (so residency can be measured from any thread
    without touching MLX) until `close()`, which also unlocks the pinned pages: call it
    before the model is dropped, or MLX's buffer cache would keep locked pages.
    """

    def __init__(self, parameters: dict[str, mx.array], report: LoadReport, host_views: bool = True) -> None:
        # On a device whose arrays are not host pages (CUDA) no view is taken: taking one
        # would move the array out of device memory (`device.weights_in_host_memory`).
        self._views = ({name: memoryview(_buffer(array)) for name, array in parameters.items()}
                       if host_views else {})
        self._device_bytes = 0 if host_views else sum(array.nbytes for array in parameters.values())
        """Bytes of weights held in device memory (no views, no pins: all of it resident there)."""
        self._pins: _native.PinSet | None = None
        self._pinned_weights = 0
        """Bytes of the arrays locked whole (the pin set's own count is of pages: more for small arrays)."""
        self._report = report
        self._lock = threading.Lock()

    @property
    def report(self) -> LoadReport:
        return self._report

    @property
    def total_bytes(self) -> int:
        return sum(v.nbytes for v in self._views.values()) + self._device_bytes

    def pin(self, policy: PinPolicy, budget_bytes: int) -> LoadReport:
        """Lock the arrays `policy` names, critical first, within `budget_bytes`; never raises
        for a refusal (the report's pin_message says what happened)."""
        message: str | None = None
        pins = _native.PinSet(budget_bytes)
        if self._device_bytes:
            with self._lock:
                self._report = replace(self._report, pinned_bytes=0,
                                       pin_message="not pinned: the weights are in device memory")
            return self._report
        pinned_weights = 0
        for name in pin_order(self._views, policy):
            err = pins.add(self._views[name])
            if err == 0:
                pinned_weights += self._views[name].nbytes
                continue
            if err == errno.ENOBUFS:
                message = (f"pin budget reached: {pins.bytes} of {budget_bytes} bytes pinned "
                           f"(weight_management.pin_budget_bytes); the rest is not pinned")
            elif err in _REFUSED:
                message = refusal_message(err, pins.bytes, self.total_bytes)
            else:
                message = f"pinning stopped: mlock failed ({os.strerror(err)}) after {pins.bytes} bytes"
            log.warning("weights not fully pinned policy=%s pinned_bytes=%d reason=%r", policy, pins.bytes, message)
            break
        with self._lock:
            self._pins, self._pinned_weights = pins, pinned_weights
            self._report = replace(self._report, pinned_bytes=pins.bytes, pin_message=message)
        return self._report

    def residency(self) -> WeightResidency:
        with self._lock:
            resident = sum(min(_native.resident_bytes(v), v.nbytes) for v in self._views.values()) + self._device_bytes
            pinned = self._pinned_weights if self._pins is not None else 0
            return WeightResidency(total=self.total_bytes, resident=resident, pinned=pinned, mapped=0)

    def close(self) -> None:
        with self._lock:
            if self._pins is not None:
                self._pins.release()
                self._pins, self._pinned_weights = None, 0
            for view in self._views.values():
                view.release()
            self._views = {}
            self._device_bytes = 0


def _buffer(array: mx.array) -> Buffer:
    # MLX arrays export the buffer protocol; its stubs do not say so.
    return cast("Buffer", array)


def refusal_message(err: int, pinned: int, wanted: int) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    return (f"the OS refused to lock more memory ({os.strerror(err)}) after {pinned} of {wanted} bytes; "
            f"RLIMIT_MEMLOCK is {limit}: raise it (ulimit -l, launchd HardResourceLimits/MemoryLock) "
            "or grant CAP_IPC_LOCK")
