"""Following the routing table: the current table and the sources that replace it.

- `holder`: the current table and the rules for replacing it.
- `configmaps`: the pool's `<pool>-routes` ConfigMap through the Kubernetes API (the
  Kubernetes client only here).
- `files`: a `routes.json` file, for use without Kubernetes.
"""
