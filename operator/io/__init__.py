"""The operator's I/O: every call it makes to the outside world, and nothing it decides.

- `kube`: the operator's own Kubernetes API calls (routing-table ConfigMaps, status
  and condition writes, listings).
- `agentclient`: calls to an agent's operations API, one typed method per route.
- `probing`: health probes of agents.
- `scraping`: the placed agents' `/metrics`, exported as per-pool load figures.
- `metrics`: the operator's own Prometheus metrics and their HTTP server.
"""
