"""The operator's reconcilers: observe, decide (through `logic/`), act (through `io/`).

- `pools`: one reconcile pass of one InferencePool.
- `caches`: ModelCache staging on the selected nodes, and cleanup.
- `monitors`: one monitor task per InferenceNode (probe, report, Ready condition).
- `runtimes`: what the running daemons share, and who to wake on a change.
- `services`: the operator's services (clients, fleet, the above), opened at startup
  and closed at cleanup; the handlers hold them in kopf's memo under one key.

Kopf-agnostic: `handlers` connects kopf to these.
"""
