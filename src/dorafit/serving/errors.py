"""OpenAI's error body for every failure the server answers: ``{"error": {"message", "type", "param", "code"}}``.

:class:`ApiError` is raised by the routes; :func:`install_error_handlers` makes everything else answer in the same
shape instead of FastAPI's ``{"detail": ...}`` or a plain-text 500: unknown routes (404), wrong methods (405),
Starlette's own HTTP errors, and any unexpected exception (500, logged with its traceback).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("dorafit.serve")

TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


class ApiError(Exception):
    """A request the server refuses or cannot answer: HTTP ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with OpenAI's error body."""

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"There is no route {request.method} {request.url.path} (see GET /v1/models)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {exc.headers.get('Allow')}"
        else:
            message = str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, message, None, code, exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return ApiError(400, f"invalid request: {exc.errors()}", None, "invalid_value").response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error").response()
