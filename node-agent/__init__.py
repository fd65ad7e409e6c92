"""The node agent: serves models with MLX on one machine over an OpenAI-compatible API.

Layers, top to bottom; each imports only the ones below it (`.importlinter`,
`agent-layers`), and a new module takes the layer of the folder it goes in:

- `main` (the `mlxpool agent` command line) and `runtime` (the composition root:
  server, model loading, readiness, registration, drain).
- `http/`: the FastAPI app and thin routes, Server-Sent Events, API keys and the ops
  token, the error table, Prometheus metrics, the operations API's routes.
- `operations/`: the node's control side behind `/v1/node`: the model manager,
  eviction, the model cache (staging from file, HTTP and hub sources), the native
  weight manager, the node report.
- `serving/`: the transport-agnostic data plane (OpenAI requests in, responses out),
  the OpenAI wire models and shapes, the model repository and its served engines
  (requests counted in flight, prompts looked up in the prompt cache), the agent's
  lifecycle, and the prompt cache's fleet-wide tier (Redis).
- `engine/` (continuous batching on mlx-lm; MLX only here) beside `node/` (what
  machine this is, the InferenceNode it registers; Kubernetes only here).
- `config` (the runtime file) and `errors` (the agent's domain errors) at the bottom.
"""
