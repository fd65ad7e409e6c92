"""Domain errors of the router and their one mapping to HTTP: the OpenAI error shape.

Every error a client can receive from the router itself (not relayed from an agent) is
one of these classes; `app` turns them into `{"error": {"message", "type", "param",
"code"}}` with the class's status. Nothing else in the router builds error bodies.
"""

from __future__ import annotations

from typing import ClassVar

from mlxpool.apierrors import ApiError, error_body

_RETRY_SOON: dict[str, str] = {"Retry-After": "1"}
"""On every 503 of the router: a table, an endpoint or a failover is usually a second away."""

__all__ = ["BadRequest", "ModelNotFound", "NoHealthyEndpoint", "NoRoutingTable", "Overloaded", "RouterError",
           "UpstreamUnavailable", "error_body"]


class RouterError(ApiError):
    """An error answered by the router itself."""


class BadRequest(RouterError):
    """The request body or headers are malformed."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(RouterError):
    """The pool's routing table does not list the requested model."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NoRoutingTable(RouterError):
    """No routing table has been loaded yet."""

    status_code = 503
    error_type = "service_unavailable"
    code = "no_routing_table"
    headers: ClassVar[dict[str, str] | None] = _RETRY_SOON


class NoHealthyEndpoint(RouterError):
    """The model is known but no endpoint can take the request now."""

    status_code = 503
    error_type = "service_unavailable"
    code = "no_healthy_endpoint"
    headers: ClassVar[dict[str, str] | None] = _RETRY_SOON


class Overloaded(RouterError):
    """Every endpoint is saturated for this request's tier: refused so more urgent ones get through."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "pool_saturated"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamUnavailable(RouterError):
    """Every candidate endpoint failed before answering."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_unavailable"
