"""The service's error hierarchy; each error renders as an OpenAI error object.

ServiceError                  500 server_error
├── InvalidRequestError       400 invalid_request_error
│   └── ContextLengthError    400 invalid_request_error / context_length_exceeded
├── NotFoundError             404 invalid_request_error / model_not_found, ...
├── ConflictError             409 invalid_request_error (e.g. cancelling a job that ended)
├── RequestTooLargeError      413 invalid_request_error / request_too_large (the body)
├── HeadersTooLargeError      431 invalid_request_error / request_header_fields_too_large
├── AuthenticationError       401 invalid_request_error / invalid_api_key
├── RateLimitError            429 requests / rate_limit_exceeded (a key's limits), with Retry-After
│   └── OverloadedError       429 requests / engine_overloaded (the model's queue is full)
├── ServiceUnavailableError   503 service_unavailable (e.g. Redis unreachable)
└── EngineError               500 server_error (the engine failed on a job)
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        # HTTP headers the response carries (Retry-After, WWW-Authenticate, ...).
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceError:
        """Rebuild an error a worker sent inside a chunk event."""
        err = data.get("error", data)
        kind = {c.error_type: c for c in (InvalidRequestError, ServiceUnavailableError)}
        klass = kind.get(err.get("type", ""), ServiceError)
        return klass(err.get("message", "unknown error"), param=err.get("param"), code=err.get("code"))


class InvalidRequestError(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class NotFoundError(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class ConflictError(ServiceError):
    status_code = 409
    error_type = "invalid_request_error"


class AuthenticationError(ServiceError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class RateLimitError(ServiceError):
    """Refused before anything was written; the client may retry after `Retry-After`."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class OverloadedError(RateLimitError):
    default_code = "engine_overloaded"


class RequestTooLargeError(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLargeError(ServiceError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class ServiceUnavailableError(ServiceError):
    status_code = 503
    error_type = "service_unavailable"


class EngineError(ServiceError):
    default_code = "engine_error"
