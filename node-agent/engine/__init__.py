"""The generation engine: one thread per model driving mlx-lm's `BatchGenerator`.

`interface` holds the typed contract the rest of the agent uses (and imports no MLX);
`generation` and `loading` are the only modules that touch MLX. Import `blas` before
MLX (they do) so the CPU backend picks up OpenBLAS.
"""
