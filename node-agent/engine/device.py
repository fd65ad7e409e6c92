"""The device MLX computes on, as MLX itself reports it: kind, name, memory, memory in use.

Not a guess from the platform: the same agent runs on Metal, on NVIDIA GPUs through
MLX's CUDA backend, and on the CPU. Only device properties and allocator counters are
read here, never work run on the device, so callers on other threads (reports,
heartbeats, /metrics) never race the engine thread for it. Importing MLX is slow the
first time: call from off the event loop (the first `accelerator()` happens at start-up).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)
from mlxpool.agent.engine.interface import Accelerator, AcceleratorKind, DeviceMemory, DeviceProbe


def parse_device_info(kind: AcceleratorKind, info: Mapping[str, Any]) -> Accelerator:
    """MLX's `device_info()` as an Accelerator (key names differ between backends and versions)."""
    name = info.get("device_name") or info.get("name")
    memory = None
    if kind is not AcceleratorKind.CPU:
        for key in ("memory_size", "total_memory", "memory"):
            value = info.get(key)
            if isinstance(value, int) and value > 0:
                memory = value
                break
    return Accelerator(kind, str(name) if name else None, memory)


@functools.cache
def accelerator() -> Accelerator:
    """The device MLX computes on (read once per process)."""
    if mx.metal.is_available():
        kind = AcceleratorKind.METAL
    elif getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        kind = AcceleratorKind.CUDA
    else:
        kind = AcceleratorKind.CPU
    try:
        info = dict(mx.device_info())
    except (RuntimeError, ValueError):
        info = {}
    return parse_device_info(kind, info)


def weights_in_host_memory(kind: AcceleratorKind) -> bool:
    """Whether a model's arrays live in host pages that we may view, pin and measure.

    True on the CPU and on Metal (unified memory: the arrays' buffers are host pages).
    False on CUDA: the weights belong in device memory, and any host view of an array
    (the buffer protocol) makes MLX move it into CUDA managed memory, where host writes
    leave it in host pages: the loader's copy, pinning and residency would then keep the
    whole model in the process's RSS (5.3-5.7 GB against mlx_lm.server's 2.3 GB on the
    H200), and the GPU would fault it back in page by page.
    """
    return kind is not AcceleratorKind.CUDA


def memory() -> DeviceMemory:
    """MLX's allocator counters now."""
    return DeviceMemory(int(mx.get_active_memory()), int(mx.get_peak_memory()), int(mx.get_cache_memory()))


PROBE = DeviceProbe(accelerator, memory)
