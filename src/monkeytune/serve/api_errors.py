"""Errors of the OpenAI-compatible API, shaped as OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal of ``monkeytune api`` is an :class:`APIError`: the handlers raise it, and one
exception handler turns it into the JSON body and status. Nothing else in the server decides
how an error looks, so each refusal reads the same whatever found it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "ERROR_TYPES", "bad_request", "error_body"]

# The ``type`` OpenAI gives each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request the server refuses or could not answer.

    Args:
        status: HTTP status (400, 401, 404, 413, 429, 500 or 503).
        message: One line for the person who sent the request.
        code: Machine-readable reason (``context_length_exceeded``, ``invalid_image`` ...).
        param: The request field at fault, as a path (``messages[1].content[0].image_url``).
        retry_after: Seconds after which a retry may succeed (429 and 503), sent as ``Retry-After``.
    """

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return error_body(self.status, self.message, self.code, self.param)

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` when set)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` for ``status``, as OpenAI writes it."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 naming the field at fault."""
    return APIError(400, message, code, param)
