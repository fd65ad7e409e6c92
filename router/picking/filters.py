"""Filter plugins: drop endpoints that should not take a request now.

Healthy/weight-0 endpoints are already removed by `RoutingTable.endpoints_for`; these
filters act on the router's own signals.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from mlxpool.router.picking.plugins import Filter, PickRequest
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


class ConnectCooldownParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: float = Field(default=5.0, ge=0, description="How long to avoid an endpoint after a connect failure.")


class ConnectCooldownFilter(Filter):
    """Skips endpoints whose last connection failed less than `seconds` ago.

    The operator removes a dead agent from the table within about a second; this keeps
    the router from paying a failed connect per request meanwhile. It never drops every
    endpoint: if all are cooling down, all stay (the table is the authority).
    """

    type_name = "connect-cooldown"
    Params = ConnectCooldownParams
    params: ConnectCooldownParams

    def filter(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[RouteEndpoint]:
        def cooling(endpoint: RouteEndpoint) -> bool:
            failed_at = signals.get(endpoint.url).connect_failed_at
            return failed_at is not None and request.now - failed_at < self.params.seconds

        survivors = [e for e in endpoints if not cooling(e)]
        return survivors or list(endpoints)


class MaxInFlightParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(ge=1, description="Requests in flight from this router above which an endpoint is skipped.")


class MaxInFlightFilter(Filter):
    """Skips endpoints already holding `limit` requests from this router (none left: 503)."""

    type_name = "max-in-flight"
    Params = MaxInFlightParams
    params: MaxInFlightParams

    def filter(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[RouteEndpoint]:
        return [e for e in endpoints if signals.get(e.url).in_flight < self.params.limit]


class CircuitBreakerFilter(Filter):
    """Skips endpoints whose circuit breaker is open (see `signals.Breaker`).

    The breaker trips on a refused connection at once, and on `breaker_failures`
    consecutive timeouts, 5xx answers or broken connections; after the open time one
    probe request goes through (half-open) and its outcome closes or re-opens it. Like
    `connect-cooldown` it never drops every endpoint: the table is the authority, and a
    pool whose every breaker is open still gets its requests tried.
    """

    type_name = "circuit-breaker"

    def filter(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[RouteEndpoint]:
        survivors = [e for e in endpoints if signals.admits(e.url, request.now)]
        return survivors or list(endpoints)
