"""The agent's operations API (`/v1/node`, contract in `mlxpool.agentapi`).

- `eviction`: which resident models make room for a new one (pure).
- `manager`: the model manager: a state machine per model (loading → warming → ready
  → unloading; failed), capacity by count and memory, LRU eviction; it serves each
  engine through `serving.servedengine`, whose in-flight count an unload waits for.
- `sources`, `fetching`, `staging`: the node's model cache: where files come from
  (file://, http(s)://, hf://), downloading them, and each entry's phases
  (Pending → Downloading → Verifying → Cached → Warm/Pinned; Failed).
- `weights`: the native weight manager (prefetch, touch, mlock, mincore) off the loop.
- `reports`: `GET /v1/node`'s NodeReport.
- `errors`: the operations API's domain errors (409, 404, 507).
- `assembly`: builds all of it from the agent's settings for the runtime.

Nothing here imports MLX (engines come from a factory the runtime passes in) or a web
framework: the HTTP routes, behind the ops token, are `http.operations`.
"""
