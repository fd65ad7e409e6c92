"""The operator's decisions as pure functions and plain data: no I/O, no kopf, no clock
of their own (callers pass `now`), so each is tested alone in milliseconds.

- `specs`: InferencePool and ModelCache specs as typed values.
- `endpoints`: placed endpoints and probe results, shared by the modules below.
- `placement`: which nodes a pool uses; `fleet`: what the operator has claimed and
  observed of every node, shared by all pools.
- `sources`, `assignments`: where an agent gets a model, and the load and stage calls
  a pool asks for.
- `tables`: a pool's routing table; `statuses`, `conditions`, `cache_statuses`: the
  statuses and conditions the operator wants written.
- `usage`: per-pool load figures from the agents' metrics.
"""
