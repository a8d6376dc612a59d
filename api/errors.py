"""The one place that turns exceptions into HTTP responses carrying OpenAI error objects."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from common.errors import InvalidRequestError, ServiceError, ServiceUnavailableError

log = logging.getLogger(__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str | None) -> str | None:
    """Text a UTF-8 response can carry: a lone surrogate echoed from a request (a field
    name, say) becomes U+FFFD instead of failing the response."""
    return text if text is None or text.isascii() else _SURROGATE.sub("\ufffd", text)


def error_response(exc: ServiceError) -> JSONResponse:
    content = exc.to_dict()
    error = content["error"]
    error["message"], error["param"] = _encodable(error["message"]), _encodable(error["param"])
    return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers or None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _union_tag(part: object) -> bool:
    """A step of an error's location naming a union member (`literal['a','b']`,
    `NamedToolChoice`, `str`, `list[int]`), not a field: the parameter is the field."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or "[" in part or part[:1].isupper()


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    where = list(first.get("loc", ()))
    if where and where[0] in ("query", "path", "header", "cookie"):
        where = where[1:]  # the parameter as sent (`starting_after`, not `query.starting_after`)
    loc = [str(p) for p in where if p != "body" and not _union_tag(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return InvalidRequestError("the request body is not valid JSON")
    if first.get("type") in ("lone_surrogate", "invalid_param"):
        # Raised for a whole object (the request, a message); the field is in the error's context.
        param = ".".join(p for p in [*loc, str((first.get("ctx") or {}).get("param", ""))] if p) or None
    param = _encodable(param)
    if first.get("type") == "missing":
        if param is None:
            return InvalidRequestError("the request body is missing")
        return InvalidRequestError(f"missing required parameter: '{param}'", param=param)
    return InvalidRequestError(f"{param}: {msg}" if param else msg, param=param)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (for a 405's `Allow`)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and isinstance(route, Route) and route.methods:
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; the path may have more.
            headers["Allow"] = ", ".join(allowed_methods(request))
        err = ServiceError(str(exc.detail), code=None, headers=headers)
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis error: %s", exc)
        return error_response(ServiceUnavailableError("cannot reach Redis; retry shortly"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ServiceError("internal server error"))
