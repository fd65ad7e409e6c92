"""The generation engine: one thread per model driving mlx-lm's `BatchGenerator`.

`interface` is the typed contract the rest of the agent uses; `prompts`, `stopping`
and `scheduling` (the priority queue) are MLX-free pieces of it. The MLX side:
`generation` (the batching thread), `loading`, `sampling` (samplers, seeded
streams), `prefixcache` (the byte-capped prompt cache) and `logprobs`, each importing
`blas` first so the CPU backend picks up OpenBLAS. This package's `__init__` imports
nothing, so importing the contract never loads MLX.
"""
