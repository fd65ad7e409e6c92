"""Prometheus metrics of the operator (`--metrics-port`).

The API request counter covers the requests the reconcilers make themselves (not
kopf's watches and finalizer patches): it is what the control-plane benchmark divides
by reconcile passes to check that unchanged pools cost no writes. The `mlxpool_pool_*`
gauges are the per-pool load figures autoscalers read (manifests/autoscaling).
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram, start_http_server

API_REQUESTS = Counter(
    "mlxpool_operator_api_requests_total",
    "Kubernetes API requests made by the reconciler.",
    ["verb", "resource"],
)
RECONCILES = Counter(
    "mlxpool_operator_reconciles_total",
    "Reconcile passes of InferencePools, by what they wrote.",
    ["outcome"],  # unchanged | routes | status | routes+status | error
)
CACHE_RECONCILES = Counter(
    "mlxpool_operator_cache_reconciles_total",
    "Reconcile passes of ModelCaches, by whether they wrote status.",
    ["outcome"],  # unchanged | status | error
)
AGENT_REQUESTS = Counter(
    "mlxpool_operator_agent_requests_total",
    "Calls to agents' operations API and /metrics, by operation and HTTP status (or unreachable).",
    ["operation", "status"],
)
PROBE_SECONDS = Histogram(
    "mlxpool_operator_probe_seconds",
    "Duration of agent health probes.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PROBES = Counter(
    "mlxpool_operator_probes_total",
    "Agent health probes, by why they were sent.",
    ["reason"],  # first | scheduled | suspected | unhealthy
)
WATCHES_OPEN = Gauge("mlxpool_operator_health_watches", "Agent health watches open now.")
WATCH_ENDS = Counter("mlxpool_operator_health_watch_ends_total",
                     "Agent health watches that ended (each one a suspicion).")
PROBE_FAILURES = Counter("mlxpool_operator_probe_failures_total", "Agent health probes that failed.")
NODE_READY = Gauge(
    "mlxpool_operator_node_ready",
    "The operator's verdict on an InferenceNode, as its Ready condition shows it (1 True, 0 False).",
    ["node"],
)
READY_ENDPOINTS = Gauge(
    "mlxpool_operator_pool_ready_endpoints",
    "Healthy endpoints of a pool after its last reconcile.",
    ["namespace", "pool"],
)
ROUTING_REVISION = Gauge(
    "mlxpool_operator_pool_routing_revision",
    "Routing-table revision of a pool.",
    ["namespace", "pool"],
)


POOL_LABELS = ["namespace", "pool"]
POOL_QUEUE_DEPTH = Gauge(
    "mlxpool_pool_queue_depth",
    "Requests waiting for a batch slot, summed over the pool's endpoints and models.",
    POOL_LABELS,
)
POOL_RUNNING = Gauge(
    "mlxpool_pool_requests_running",
    "Requests in the engines' batches, summed over the pool's endpoints and models.",
    POOL_LABELS,
)
POOL_TOKENS_PER_SECOND = Gauge(
    "mlxpool_pool_generation_tokens_per_second",
    "Tokens generated per second by the pool's endpoints, between the last two scrapes.",
    POOL_LABELS,
)
POOL_UTILIZATION = Gauge(
    "mlxpool_pool_utilization",
    "Share (0-1) of the pool's scraped endpoints with at least one request in their batch.",
    POOL_LABELS,
)
POOL_SCRAPED_ENDPOINTS = Gauge(
    "mlxpool_pool_scraped_endpoints",
    "Endpoints of the pool whose /metrics answered at the last scrape.",
    POOL_LABELS,
)
USAGE_GAUGES = (POOL_QUEUE_DEPTH, POOL_RUNNING, POOL_TOKENS_PER_SECOND, POOL_UTILIZATION, POOL_SCRAPED_ENDPOINTS)


class MetricsServer:
    """/metrics served from a background thread (prometheus_client's own WSGI server)."""

    def __init__(self, port: int, address: str) -> None:
        self._server, self._thread = start_http_server(port, addr=address)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def forget_pool(namespace: str, pool: str) -> None:
    for gauge in (READY_ENDPOINTS, ROUTING_REVISION, *USAGE_GAUGES):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, pool)
