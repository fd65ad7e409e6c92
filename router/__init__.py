"""The router: the OpenAI-compatible front door of one InferencePool.

It follows the pool's routing table (written by the operator, `mlxpool.routing`), picks
endpoints with a pipeline of filter and scorer plugins (`picking`, `profiles`), and
forwards requests to agents with failover (`forwarding`). It owns no health checks:
the operator decides which endpoints are healthy; the router only adds fast local
signals (in-flight counts, time to first byte, recent connect failures).
"""
