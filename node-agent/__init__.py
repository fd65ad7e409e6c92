"""The node agent: serves models with MLX on one machine over an OpenAI-compatible API.

Layers, top to bottom (each imports only the ones below it):
`main` (CLI; `config`: the runtime file, env overrides, flags) → `runtime`
(composition root: server, model loading, readiness, registration, drain) → `app`
(FastAPI factory, thin routes; `auth`: API keys and the ops token; `sse`: event
streams) and `operations` (the /v1/node API) → `dataplane` (transport-agnostic
request handling; `shaping`: OpenAI shapes of token events) → `engine` (continuous
batching on mlx-lm: priority queue, prefix cache, samplers, log-probabilities).
MLX and mlx-lm are imported only under `engine/`; the Kubernetes client only in
`registration`.
"""
