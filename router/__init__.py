"""The router: the OpenAI-compatible front door of one InferencePool.

It follows the pool's routing table (written by the operator, `mlxpool.routing`), picks
endpoints with a pipeline of filter and scorer plugins, and forwards requests to agents
with failover. It owns no health checks: the operator decides which endpoints are
healthy; the router only adds fast local signals (in-flight counts, time to first
byte, recent connect failures).

Layers, top to bottom (`.importlinter`, `router-layers`): `main` (command line) →
`app` (FastAPI factory, lifespan, the other routes) → `relaying` (the two inference
routes as plain ASGI) → `forwarding` (the data plane: candidates, tries, relay) → `metrics`,
`parsing` → `picking/` (filters, scorers, picker, profiles, prefix index, signals)
and `tables/` (the current table and its followers) → `settings`, `errors`.
"""
