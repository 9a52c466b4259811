"""Errors a client can act on, in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every way a request can fail is one :class:`ApiError` with an HTTP status and a message that names
the problem and the fix. Anything else that goes wrong is logged on the server and answered with
a generic 500: a traceback never reaches the client.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "error_body", "internal_error"]


class ApiError(Exception):
    """A failed request: HTTP ``status`` plus the OpenAI error fields.

    Args:
        status: HTTP status (400 bad input, 401 no or wrong key, 404 unknown model or route,
            413 body too large, 429 queue full, 500 server fault, 503 shutting down).
        message: what is wrong and what to do about it.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if one is.
        code: a short machine-readable code (``model_not_found``, ``invalid_api_key``, ...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error() -> ApiError:
    return ApiError(500, "the server failed on this request; the details are in the server log",
                    type="server_error", code="internal_error")
