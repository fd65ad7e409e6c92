"""OpenBLAS must be loaded before MLX, whatever module of the engine is imported first.

Without it MLX's Linux CPU backend uses its bundled reference BLAS (~40x slower float32
matmuls). An import sorter once moved `import mlx` above `engine.blas` in the engine's
modules and nothing noticed: this runs each import in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlxpool.agent.engine import blas

ENGINE_MODULES = ["generation", "kvcodec"]


@pytest.mark.skipif(not os.path.exists(blas.DEFAULT_OPENBLAS), reason="no OpenBLAS on this host")
@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_openblas_loaded_before_mlx(module: str) -> None:
    code = (
        f"import mlxpool.agent.engine.{module}\n"
        "from mlxpool.agent.engine import blas\n"
        "print(blas.preloaded)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXPOOL_OPENBLAS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == blas.DEFAULT_OPENBLAS, out.stderr
    assert "openblas not preloaded" not in out.stderr
