"""Errors to HTTP, in one place. Every error body is `{code, message, field?}`; nothing a client
sends produces a 500, and 429/503 say when to come back (`Retry-After`)."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import CityServeError, ConfigError, InvalidInput

logger = logging.getLogger("ray.serve")


class ErrorBody(BaseModel):
    """The body of every error response."""

    code: str = Field(description="Stable, machine-readable error code.", examples=["quota_exceeded"])
    message: str = Field(description="What went wrong and what to do about it.",
                         examples=["over quota (600 requests and 6000 items per 60 s)"])
    field: str | None = Field(None, description="The request field at fault, where there is one.",
                              examples=["items[2].text"])


class HttpError(CityServeError):
    """An error with its HTTP status; `retry_after` (seconds) becomes the Retry-After header."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class Unauthorized(HttpError):
    status, code = 401, "unauthorized"


class Forbidden(HttpError):
    status, code = 403, "forbidden"


class NotFound(HttpError):
    status, code = 404, "not_found"


class TooLarge(HttpError):
    status, code = 413, "too_large"


class UnsupportedMediaType(HttpError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(HttpError):
    status, code = 422, "invalid_input"


class QuotaExceeded(HttpError):
    status, code = 429, "quota_exceeded"


class Internal(HttpError):
    status, code = 500, "internal"


class Unavailable(HttpError):
    status, code = 503, "unavailable"


class GatewayTimeout(HttpError):
    status, code = 504, "timeout"


BY_STATUS: dict[int, type[HttpError]] = {cls.status: cls for cls in HttpError.__subclasses__()}


def status_of(exc: CityServeError) -> int:
    """The HTTP status of any platform error (a domain's `InvalidInput` is the client's 422)."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, InvalidInput | ConfigError):
        return 422
    return 503  # registry and model errors: the service, not the request, is at fault


def error_response(exc: CityServeError, request_id: str = "") -> JSONResponse:
    headers = {"X-Request-Id": request_id} if request_id else {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(exc.as_json(), status_code=status_of(exc), headers=headers)


def field_path(loc: tuple[int | str, ...]) -> str:
    """('body', 'items', 2, 'text') -> 'items[2].text'."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def register_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(CityServeError)
    async def _platform(request: Request, exc: CityServeError) -> JSONResponse:
        return error_response(exc, request.headers.get("x-request-id", ""))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        return error_response(Unprocessable(first["msg"], field=field_path(tuple(first["loc"]))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        cls = BY_STATUS.get(exc.status_code, HttpError)
        err = cls(str(exc.detail), code=codes.get(exc.status_code, cls.code))
        response = error_response(err)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Reached only by our own bugs: say so without leaking internals, keep the trace in the log.
        logger.exception("unexpected error")
        return JSONResponse({"code": "internal", "message": "internal error; the request id is in the "
                             "X-Request-Id header"}, status_code=500)
