"""Load OpenBLAS ahead of MLX on Linux: ~40x faster float32 matmuls on the CPU backend.

MLX's Linux CPU wheel links a slow bundled reference BLAS. Loading Debian's OpenBLAS
with RTLD_GLOBAL *before* the first `import mlx` makes its symbols win (see
shared/notes/mlx-serving.md). Importing this module does it once; it does nothing on
macOS (Metal) or when the library is absent. `MLXPOOL_OPENBLAS` overrides the path;
set it to an empty string to opt out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

DEFAULT_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

log = logging.getLogger(__name__)

preloaded: str | None = None
"""The path of the library loaded by this module, or None."""


def preload_openblas(path: str | None = None) -> str | None:
    """Load OpenBLAS globally if it exists and MLX is not imported yet; returns its path."""
    global preloaded
    if preloaded is not None:
        return preloaded
    path = os.environ.get("MLXPOOL_OPENBLAS", DEFAULT_OPENBLAS) if path is None else path
    if not path or not sys.platform.startswith("linux") or not os.path.exists(path):
        return None
    if "mlx.core" in sys.modules:
        log.warning("openblas not preloaded: mlx was imported first path=%s", path)
        return None
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    preloaded = path
    return path


preload_openblas()
