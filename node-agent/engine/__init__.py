"""The generation engine: one thread per model driving mlx-lm's `BatchGenerator`.

`interface` is the typed contract the rest of the agent uses; `prompts`, `stopping`
and `scheduling` (the priority queue) are MLX-free pieces of it. The MLX side:
`generation` (the batching thread), `loading`, `sampling` (samplers, seeded
streams), `prefixcache` (the byte-capped prompt cache) and `logprobs`, each importing
`blas` first so the CPU backend picks up OpenBLAS. This package's `__init__` imports
`blas` (ctypes only, no MLX): any `mlxpool.agent.engine.*` import runs it before the
module's own `import mlx`, whatever order an import sorter gives that module's imports.
Importing the contract still never loads MLX.
"""

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (before any mlx import)

