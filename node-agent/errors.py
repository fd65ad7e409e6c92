"""Domain errors of the agent and the one table mapping them to HTTP responses.

Everything below the routes raises these (or lets validation fail); the app turns
each into OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`, so
every client library parses our errors like OpenAI's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class AgentError(Exception):
    """Base class; subclasses fix the HTTP status, the error type and code."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(AgentError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(AgentError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotReady(AgentError):
    """The agent cannot take generation requests yet (loading) or any more (draining)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "not_ready"


class Draining(NotReady):
    code = "draining"


class GenerationFailed(AgentError):
    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: AgentError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(error, NotReady) else None
    return JSONResponse(
        error_body(error.message, error.error_type, error.param, error.code),
        status_code=error.status_code,
        headers=headers,
    )


async def _agent_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AgentError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        message = f"the body is not valid JSON: {detail}".rstrip(": ")
        return JSONResponse(error_body(message, "invalid_request_error"), 400)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problem(s))"
    return JSONResponse(error_body(message, "invalid_request_error", param), 400)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), error_type), exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error path=%s", request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal error", "server_error"), 500)


EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    AgentError: _agent_error,
    RequestValidationError: _validation_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
