"""Endpoint picking: pure decision logic over the routing table and local signals.

- `plugins`: the plugin interface (filters, scorers, the pick request).
- `filters`, `scorers`: the plugins; `picker`: filters, then a weighted sum of
  scores, then a ranked candidate list that failover walks.
- `profiles`: which plugins with which weights a table's `strategy` names.
- `prefixindex`: which endpoints were recently sent which prompt prefix.
- `signals`: what this router observes of each endpoint.
"""
