"""Prometheus metrics of the operator (`--metrics-port`).

The API request counter covers the requests the reconciler makes itself (not kopf's
watches and finalizer patches): it is what the control-plane benchmark divides by
reconcile passes to check that unchanged pools cost no writes.
"""

from __future__ import annotations

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
PROBE_SECONDS = Histogram(
    "mlxpool_operator_probe_seconds",
    "Duration of agent health probes.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PROBE_FAILURES = Counter("mlxpool_operator_probe_failures_total", "Agent health probes that failed.")
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


class MetricsServer:
    """/metrics served from a background thread (prometheus_client's own WSGI server)."""

    def __init__(self, port: int, address: str) -> None:
        self._server, self._thread = start_http_server(port, addr=address)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def forget_pool(namespace: str, pool: str) -> None:
    for gauge in (READY_ENDPOINTS, ROUTING_REVISION):
        try:
            gauge.remove(namespace, pool)
        except KeyError:
            pass
