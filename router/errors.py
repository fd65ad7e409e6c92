"""Domain errors of the router and their one mapping to HTTP: the OpenAI error shape.

Every error a client can receive from the router itself (not relayed from an agent) is
one of these classes; `app` turns them into `{"error": {"message", "type", "param",
"code"}}` with the class's status. Nothing else in the router builds error bodies.
"""

from __future__ import annotations

from typing import Any, ClassVar


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RouterError(Exception):
    """An error answered by the router itself."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class BadRequest(RouterError):
    """The request body or headers are malformed."""

    status = 400
    type = "invalid_request_error"


class ModelNotFound(RouterError):
    """The pool's routing table does not list the requested model."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NoRoutingTable(RouterError):
    """No routing table has been loaded yet."""

    status = 503
    type = "service_unavailable"
    code = "no_routing_table"


class NoHealthyEndpoint(RouterError):
    """The model is known but no endpoint can take the request now."""

    status = 503
    type = "service_unavailable"
    code = "no_healthy_endpoint"


class UpstreamUnavailable(RouterError):
    """Every candidate endpoint failed before answering."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"
