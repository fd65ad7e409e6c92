"""The operator's decisions as pure functions and plain data: no I/O, no kopf, no clock
of their own (callers pass `now`), so each is tested alone in milliseconds.

- `specs`: InferencePool and ModelCache specs as typed values.
- `endpoints`: placed endpoints and probe results, shared by the modules below.
- `placement`: which nodes a pool uses; `fleet`: what the operator knows of every
  node, shared by all pools: what it has `claims` on (pools' models per node, what it
  loaded, unloads it owes, orphans) and what `observations` it has (node objects,
  probes, agent reports, failed loads).
- `monitoring`: what a node monitor decides at each tick (probe verdicts, unloads,
  report refreshes, heartbeat news, the Ready condition).
- `sources`, `assignments`: where an agent gets a model, and the load and stage calls
  a pool asks for.
- `tables`: a pool's routing table; `statuses`, `conditions`, `cache_statuses`: the
  statuses and conditions the operator wants written.
- `usage`: per-pool load figures from the agents' metrics.
"""
