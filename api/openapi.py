"""The OpenAPI document says what the API really answers.

- `ErrorResponse`: the OpenAI error object every error carries (`api.errors`).
- `error_responses(...)`: the `responses=` of a route, one entry per error status it
  answers (with the headers that come with it: `Retry-After` on 429).
- `customize_openapi(app, settings)`: what no single route can say. Validation errors are
  400s (`api.errors`), never FastAPI's 422, so every 422 goes; every operation but the
  public health checks needs a bearer API key (`api.auth`): the `bearerAuth` security
  scheme, and a 401 with `WWW-Authenticate`; any request may get a 431 (`api.limits`).
  Also: the chat and Responses limits that are settings (`n`, `messages`, `max_tokens`,
  `input`), optional parameters without FastAPI's `null` (HTTP has none), integer bounds
  as exact integers.

`tests/unit/test_openapi.py` checks the document; `tests/integration/test_fuzz.py` fuzzes
the running stack against it (schemathesis).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from api.auth import PUBLIC_PATHS
from common.schemas import ChatCompletionChunk, CompletionChunk
from common.settings import Settings

SECURITY_SCHEME = "bearerAuth"


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for people.")
    type: str = Field(description="`invalid_request_error`, `requests`, `service_unavailable` or `server_error`.")
    param: str | None = Field(description="The parameter at fault, if one is.")
    code: str | None = Field(
        description="A stable code: `invalid_api_key`, `model_not_found`, `context_length_exceeded`, "
        "`rate_limit_exceeded`, ..."
    )


class ErrorResponse(BaseModel):
    """An OpenAI error object."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    status: str = Field(description="`ok`")
    redis: str = Field(description="`ok`")
    models: list[str] = Field(description="The models that have a live worker.")
    open_streams: int = Field(description="SSE streams this API process is serving.")
    ready_models: list[str] = Field(description="Models whose requests can be validated right now.")


class HealthUnavailable(BaseModel):
    status: str = Field(description="`unavailable`")
    redis: str = Field(description="The error reaching Redis.")


def _header(description: str, schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


RETRY_AFTER = _header("Seconds to wait before retrying.", {"type": "integer", "minimum": 0})
# Sent when the per-key request limit is on (`REQUESTS_PER_MINUTE_PER_KEY`).
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": _header("Requests allowed per minute.", {"type": "integer"}, required=False),
    "x-ratelimit-remaining-requests": _header("Requests left this minute.", {"type": "integer"}, required=False),
    "x-ratelimit-reset-requests": _header(
        "When the window resets, e.g. `17s`.", {"type": "string", "pattern": "^[0-9]+s$"}, required=False
    ),
}


def sse_event(chunk: str) -> dict[str, Any]:
    """One event of an SSE stream (OpenAPI 3.1: a text/event-stream `schema` describes each
    event): `data` is a chunk (the `chunk` component), an error object, or the final
    `[DONE]`. Streams of a create request have `data` lines only; a resumed stream's
    events have their sequence number as `id` too."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"type": "string"},
                "id": {"type": "string", "description": "The event's sequence number: resume after it."},
                "retry": {"type": "integer"},
                "data": {
                    "type": "string",
                    "anyOf": [
                        {"const": "[DONE]"},
                        {
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "anyOf": [
                                    {"$ref": f"#/components/schemas/{chunk}"},
                                    {"$ref": "#/components/schemas/ErrorResponse"},
                                ]
                            },
                        },
                    ],
                },
            },
        }
    }


SSE_EVENT = sse_event("ChatCompletionChunk")
REQUEST_ID = _header("The job's id (`chatcmpl-...`).", {"type": "string"}, required=False)
WWW_AUTHENTICATE = _header("`Bearer realm=...`", {"type": "string"})

DESCRIPTIONS = {
    400: "Invalid request: a parameter is missing or invalid (`param` names it).",
    401: "Missing or invalid API key (`invalid_api_key`).",
    404: "Not found.",
    409: "Conflict with the resource's state.",
    413: "Request body too large.",
    429: "Too many requests: a limit of the key or of the model's queue; retry after `Retry-After` seconds.",
    431: "Request headers too large.",
    500: "Internal error.",
    503: "Service unavailable (Redis unreachable, tokenizer not loaded yet); retry shortly.",
}


def error_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route answering these error statuses with an `ErrorResponse`.
    `descriptions` override the generic text, keyed `e404=...` and so on."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": ErrorResponse,
            "description": descriptions.get(f"e{status}", DESCRIPTIONS[status]),
        }
        if status == 429:
            entry["headers"] = {"Retry-After": RETRY_AFTER, **RATE_LIMIT_HEADERS}
        out[status] = entry
    return out


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS


def _component(doc: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """A `$ref` to `model`, adding it (and what it refers to) to the components."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    name = model.__name__
    if name not in schemas:
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for sub, sub_schema in generated.pop("$defs", {}).items():
            schemas.setdefault(sub, sub_schema)
        schemas[name] = generated
    return {"$ref": f"#/components/schemas/{name}"}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without FastAPI's `null` branch: an HTTP parameter is
    absent or a string, never null (a literal `null` is refused where it is no valid value)."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list) or {"type": "null"} not in branches:
        return schema
    rest = [b for b in branches if b != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(rest) == 1:
        return {**rest[0], **out}
    return {**out, "anyOf": rest}


def _drop_unreferenced(doc: dict[str, Any], names: tuple[str, ...]) -> None:
    schemas = doc.get("components", {}).get("schemas", {})
    for name in names:
        if name in schemas:
            rest = {k: v for k, v in doc.items() if k != "components"}
            others = {k: v for k, v in schemas.items() if k not in names}
            if f"#/components/schemas/{name}" not in json.dumps([rest, others]):
                del schemas[name]


def _configured_limits(props: dict[str, Any], settings: Settings) -> None:
    """The chat request limits that are settings (`ChatAdapter`, `api.limits`)."""
    _cap(props["n"], "maximum", settings.max_n)
    props["messages"]["maxItems"] = settings.max_messages
    for name in ("max_tokens", "max_completion_tokens"):
        # n × max_tokens is capped too; for n = 1 that caps max_tokens itself.
        for branch in props[name].get("anyOf", [props[name]]):
            if branch.get("type") == "integer":
                branch["maximum"] = min(
                    branch.get("maximum", settings.max_total_completion_tokens), settings.max_total_completion_tokens
                )


def _configured_completion_limits(props: dict[str, Any], settings: Settings) -> None:
    """The completion request limits that are settings (`CompletionAdapter._limits`)."""
    _cap(props["n"], "maximum", settings.max_n)
    for branch in props["prompt"].get("anyOf", []):
        if branch.get("type") == "array" and branch.get("items", {}).get("type") in ("string", "array"):
            branch["maxItems"] = settings.max_prompts
    _cap(props["max_tokens"], "maximum", settings.max_total_completion_tokens)


def _configured_responses_limits(props: dict[str, Any], settings: Settings) -> None:
    """The Responses request limits that are settings: those of the chat request that
    answers it (`check_chat_limits`). Each input item is at most one chat message and the
    instructions one more (a `previous_response_id`'s conversation adds its own)."""
    for branch in props["input"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = max(1, settings.max_messages - 1)
    _cap(props["max_output_tokens"], "maximum", settings.max_total_completion_tokens)


def _cap(prop: dict[str, Any], key: str, value: int) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            branch[key] = min(branch.get(key, value), value)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_bounds(node: Any) -> None:
    """FastAPI's OpenAPI models hold numeric bounds as floats: an integer's `maximum` of
    2**63 - 1 comes out as 9.223372036854776e18, which admits 2**63 and more. Integer
    bounds go back to integers: exact up to 2**53, and past that only the int64 limits occur."""
    if isinstance(node, list):
        for item in node:
            _integer_bounds(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "integer":
        for key in BOUNDS:
            value = node.get(key)
            if isinstance(value, float):
                node[key] = int(value) if abs(value) <= 2**53 else (INT64_MAX if value > 0 else INT64_MIN)
    for child in node.values():
        _integer_bounds(child)


def fix_document(doc: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Apply the API-wide facts (and the configured limits) to a generated document (in
    place, and returned)."""
    components = doc.setdefault("components", {})
    schemas = components.get("schemas", {})
    request = schemas.get("ChatCompletionRequest")
    if settings is not None and request is not None:
        _configured_limits(request["properties"], settings)
    completion = schemas.get("CompletionRequest")
    if settings is not None and completion is not None:
        _configured_completion_limits(completion["properties"], settings)
    responses = schemas.get("ResponsesRequest")
    if settings is not None and responses is not None:
        _configured_responses_limits(responses["properties"], settings)
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>` (API_KEYS, ADMIN_API_KEYS).",
    }
    _component(doc, ChatCompletionChunk)  # the events of every SSE stream (see sse_event)
    _component(doc, CompletionChunk)
    _component(doc, ErrorResponse)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                continue
            for param in op.get("parameters", []):
                if not param.get("required") and "schema" in param:
                    param["schema"] = _without_null(param["schema"])
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400s
            responses["431"] = {
                "description": DESCRIPTIONS[431],
                "content": {"application/json": {"schema": _component(doc, ErrorResponse)}},
            }
            if _is_public(path):
                op["security"] = []
                continue
            op["security"] = [{SECURITY_SCHEME: []}]
            responses["401"] = {
                "description": DESCRIPTIONS[401],
                "headers": {"WWW-Authenticate": WWW_AUTHENTICATE},
                "content": {"application/json": {"schema": _component(doc, ErrorResponse)}},
            }
    _drop_unreferenced(doc, ("HTTPValidationError", "ValidationError"))
    _integer_bounds(doc)
    return doc


def customize_openapi(app: FastAPI, settings: Settings | None = None) -> None:
    """Make `app.openapi()` (and `/openapi.json`) serve the fixed document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            fix_document(generate(), settings)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
