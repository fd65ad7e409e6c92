"""The generation engine: one thread per model driving mlx-lm's `BatchGenerator`.

`interface` is the typed contract the rest of the agent uses; `prompts`, `stopping`
and `scheduling` are MLX-free pieces of it. `generation` (the batching thread) and
`loading` are the only modules that import MLX, each after `blas` so the CPU backend
picks up OpenBLAS. This package's `__init__` imports nothing, so importing the
contract never loads MLX.
"""
