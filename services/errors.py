"""Errors to HTTP, in one place. Every error body is `{code, message, field?}`; nothing a client
sends produces a 500, and 429/503 say when to come back (`Retry-After`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

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
    """An error with its HTTP status; `retry_after` (seconds) becomes the Retry-After header.

    A subclass names its status and code in its class line:
    `class Unauthorized(HttpError, status=401, code="unauthorized")`.
    """

    status = 400
    code = "bad_request"

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class Unauthorized(HttpError, status=401, code="unauthorized"):
    """No API key, a malformed one, or one that is unknown, expired or revoked."""


class Forbidden(HttpError, status=403, code="forbidden"):
    """A valid key whose tenant is not granted the domain it calls."""


class NotFound(HttpError, status=404, code="not_found"):
    """A route the gateway does not serve."""


class TooLarge(HttpError, status=413, code="too_large"):
    """A body, or a number of items, over the endpoint's or the tenant's limit."""


class UnsupportedMediaType(HttpError, status=415, code="unsupported_media_type"):
    """A body declared as anything but JSON."""


class Unprocessable(HttpError, status=422, code="invalid_input"):
    """A body that is not JSON or does not validate, or items the model refuses (an unknown sensor, say);
    a text in a language no model reads has the code `unsupported_language`."""


class QuotaExceeded(HttpError, status=429, code="quota_exceeded"):
    """A tenant over its per-minute quota or its concurrency; Retry-After says when to come back."""


class Internal(HttpError, status=500, code="internal"):
    """A model that fails on a request's items: our fault, not the client's."""


class Unavailable(HttpError, status=503, code="unavailable"):
    """A domain not ready, at capacity or restarting, or the admission service away; Retry-After says when."""


class GatewayTimeout(HttpError, status=504, code="timeout"):
    """A domain that did not answer within its timeout."""


BY_STATUS: dict[int, type[HttpError]] = {cls.status: cls for cls in HttpError.__subclasses__()}


def status_of(exc: CityServeError) -> int:
    """The HTTP status of any platform error (a domain's `InvalidInput` is the client's 422)."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, InvalidInput | ConfigError):
        return 422
    return 503  # registry and model errors: the service, not the request, is at fault


def error_response(exc: CityServeError, headers: dict[str, str]) -> JSONResponse:
    headers = dict(headers)
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


def register_exception_handlers(app: FastAPI, id_header: Callable[[Request], dict[str, str]]) -> None:
    """Every error answer, `id_header(request)` among its headers: the request's X-Request-Id as the
    app validated it (the gateway's `request_id_header`), never a client's raw header."""

    @app.exception_handler(CityServeError)
    async def _platform(request: Request, exc: CityServeError) -> JSONResponse:
        return error_response(exc, id_header(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        return error_response(Unprocessable(first["msg"], field=field_path(tuple(first["loc"]))), id_header(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        cls = BY_STATUS.get(exc.status_code, HttpError)
        err = cls(str(exc.detail), code=codes.get(exc.status_code, cls.code))
        response = error_response(err, id_header(request))
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Reached only by our own bugs: say so without leaking internals, keep the trace in the log.
        logger.exception("unexpected error")
        return JSONResponse({"code": "internal", "message": "internal error; the request id is in the "
                             "X-Request-Id header"}, status_code=500, headers=id_header(request))
