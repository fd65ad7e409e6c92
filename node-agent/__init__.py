"""The node agent: serves models with MLX on one machine over an OpenAI-compatible API.

Layers, top to bottom (each imports only the ones below it):
`main` (CLI) → `runtime` (composition root: server, model loading, readiness,
registration, drain) → `app` (FastAPI factory, thin routes) → `dataplane`
(transport-agnostic request handling) → `engine` (continuous batching on mlx-lm).
MLX and mlx-lm are imported only under `engine/`; the Kubernetes client only in
`registration`.
"""
