"""Prometheus metrics of one router, in a registry of its own.

A registry per router (not the process-global one) so several routers can live in one
test process. Endpoints are labelled by node name: bounded by the fleet's size.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mlxpool.router.tables.holder import Offer
from mlxpool.routing import RoutingTable


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlxpool_router_requests", "Inference requests answered, by model, endpoint (node) and HTTP status.",
            ["model", "endpoint", "status"], registry=r)
        self.upstream_errors = Counter(
            "mlxpool_router_upstream_errors",
            "Failed attempts at an endpoint: connect, timeout (before the first byte), http_5xx, protocol, "
            "or stream (broken after bytes were relayed).",
            ["endpoint", "kind"], registry=r)
        self.failovers = Counter(
            "mlxpool_router_failovers", "Requests moved to the next candidate endpoint after a failed attempt.",
            ["model"], registry=r)
        self.in_flight = Gauge(
            "mlxpool_router_in_flight_requests", "Requests sent to an endpoint and not yet fully relayed.",
            ["endpoint"], registry=r)
        self.first_byte_seconds = Histogram(
            "mlxpool_router_upstream_first_byte_seconds", "Seconds from sending a request to its first body byte.",
            ["model", "stream"], registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.signal_age = Gauge(
            "mlxpool_router_endpoint_signal_age_seconds",
            "Age of the endpoint's last load report (-1: none yet); past the staleness bound it is not trusted.",
            ["endpoint"], registry=r)
        self.breaker_trips = Counter(
            "mlxpool_router_breaker_trips", "Times an endpoint's circuit breaker opened (or re-opened after a probe).",
            ["endpoint"], registry=r)
        self.shed = Counter(
            "mlxpool_router_shed_requests", "Requests refused with 429 because every endpoint was saturated, by tier.",
            ["model", "priority"], registry=r)
        self.table_revision = Gauge(
            "mlxpool_router_table_revision", "Revision of the routing table in use (-1 before the first).", registry=r)
        self.table_revision.set(-1)
        # Set at each scrape: a count that only grows is a task leak (the soak watches it).
        self.loop_tasks = Gauge(
            "mlxpool_router_asyncio_tasks", "asyncio tasks alive in the router's event loop at scrape time.",
            registry=r)
        self.table_updates = Counter(
            "mlxpool_router_table_updates", "Routing tables offered by the source, by outcome.", ["result"], registry=r)

    def table_accepted(self, table: RoutingTable) -> None:
        self.table_revision.set(table.revision)

    def table_offered(self, offer: Offer) -> None:
        self.table_updates.labels(offer.value).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
