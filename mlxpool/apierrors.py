"""The OpenAI error shape, shared by every HTTP server of mlxpool.

`{"error": {"message", "type", "param", "code"}}` is what OpenAI's client libraries
parse, so the agent (inference and operations APIs) and the router answer every error
in it. Each component subclasses `ApiError` once per failure, fixing the status, the
type and a stable `code` clients can branch on without parsing messages; its app maps
the base class to a response in one handler. Pure: no web framework is imported here.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["ApiError", "error_body"]


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered over HTTP; subclasses fix the status, the error type and code."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    headers: ClassVar[dict[str, str] | None] = None
    """Extra response headers (e.g. Retry-After, WWW-Authenticate)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)
