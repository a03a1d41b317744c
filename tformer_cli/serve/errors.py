"""Errors as OpenAI sends them, `{"error": {"message", "type", "param", "code"}}`, no traceback.

Every way a request can fail ends here: our own checks (APIError), a body that is not the
schema (422, or 400 for JSON that does not parse), a route or method that does not exist
(404/405), and anything unexpected (500, logged with its traceback on the server's side only).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tformer.serve")

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    """A request that cannot be served: its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        default = "invalid_request_error" if status < 500 else "server_error"
        self.type = type or _TYPES.get(status, default)

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        fields = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**fields, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a JSON response (401s also say which scheme: Bearer)."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid_body(errors: list[dict]) -> APIError:
    """422 naming the first field that is missing, unknown or of the wrong type or range.

    errors is pydantic's list (ValidationError.errors()); a body that is not JSON at all is 400.
    A field that takes several types (a prompt: text, token ids or lists of either) fails once
    per type: the field is what their locations share.
    """
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="json_invalid")
    locs = [[str(p) for p in e.get("loc", ()) if p != "body"] for e in errors] or [[]]
    shared = []
    for parts in zip(*locs, strict=False):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    param = ".".join(shared if len(errors) > 1 else locs[0]) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif len(errors) > 1 and shared != locs[0]:
        message = f"{param}: not any of the types this field takes"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(422, message, param=param, code=kind or None)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (RequestValidationError, ValidationError))
    return invalid_body(list(exc.errors())).response()


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    error = APIError(exc.status_code, message)
    response = error.response()
    response.headers.update(exc.headers or {})
    return response


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}").response()


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can answer with, in OpenAI's shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
