"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

import logging
from typing import Callable, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_log = logging.getLogger("llama.server")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered with `status` and an OpenAI error object.

    Args:
        status: the HTTP status.
        message: what went wrong and how to fix it.
        param: the request field at fault, if any.
        code: a short machine-readable code, if any.
        headers: extra response headers (e.g. Retry-After).
        error_type: the `type` field, when not the usual one for `status` (OpenAI answers an
            unknown model with 404 and "invalid_request_error").
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        error_type: Optional[str] = None,
    ):
        super().__init__(message)
        self.error_type = error_type
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body: `{"error": {...}}`."""
        return error_body(self.status, self.message, self.param, self.code, self.error_type)

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int,
    message: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    error_type: Optional[str] = None,
) -> dict:
    """An OpenAI error object for `status` (its type from `ERROR_TYPES` unless `error_type`)."""
    return {
        "error": {
            "message": message,
            "type": error_type or ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 invalid-request error."""
    return APIError(400, message, param=param, code=code)


def unexpected(error: BaseException, log: bool = True) -> APIError:
    """The 500 answering an exception nobody expected, logged with its traceback unless `log`
    is False (the catch-all handler leaves that to the ASGI server, which logs what it re-raises)."""
    if log:
        _log.error("unexpected error while answering a request", exc_info=error)
    return APIError(
        500,
        f"internal server error ({type(error).__name__}); the server logged the details",
        code="internal_error",
    )


def error_event(error: Exception, on_error: Callable[[int], None]) -> dict:
    """The error object ending a stream that failed after its headers were sent: an `APIError`
    as it is, anything else as an unexpected 500 (logged); `on_error(status)` counts it."""
    api_error = error if isinstance(error, APIError) else unexpected(error)
    on_error(api_error.status)
    return api_error.body()


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Answer every error the app raises (ours, routing's, validation's, and any unexpected
    exception as a 500) in the OpenAI shape, calling `on_error(status)` for each."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        on_error(error.status)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        on_error(error.status_code)
        return JSONResponse(
            error_body(error.status_code, str(error.detail)),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        on_error(400)
        return JSONResponse(error_body(400, str(error)), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        on_error(500)
        return unexpected(error, log=False).response()
