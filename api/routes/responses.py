"""OpenAI's Responses API, durable (api.endpoints.responses): create (plain, streaming,
background), retrieve (or stream from any `starting_after`), cancel, delete, list a
response's input items."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from api.deps import PrincipalDep, ResponsesDep, SettingsDep
from api.jobs.reader import MAX_CURSOR
from api.metrics import count_resume
from api.openapi import RATE_LIMIT_HEADERS, REQUEST_ID, error_responses
from api.routes.chat import create, sse
from common.responses import ResponsesRequest

router = APIRouter()

STREAM_DESCRIPTION = (
    "Server-sent events as OpenAI sends them: `event: <type>` and `data: <json>` pairs, each with its "
    "`sequence_number` (`response.created`, `response.in_progress`, `response.output_item.added`, "
    "`response.content_part.added`, `response.output_text.delta`..., the `.done` events, then "
    "`response.completed`, `response.incomplete`, `response.failed` or `response.cancelled`)."
)
RESPONSE_OBJECT = {"application/json": {"schema": {"type": "object", "description": "A `response` object."}}}
# One event of a Responses stream (OpenAPI 3.1: a text/event-stream `schema` describes each
# event): `event` is its type, `data` the event as JSON (an `error` event too).
RESPONSE_EVENT = {
    "schema": {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "description": "The event's `type`."},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "type": "object",
                    "required": ["type", "sequence_number"],
                    "properties": {
                        "type": {"type": "string"},
                        "sequence_number": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
    }
}


@router.post(
    "/v1/responses",
    response_model=None,
    responses={
        200: {
            "description": "A `response`; with `background`, the queued response; with `stream`, its events. "
            + STREAM_DESCRIPTION,
            "content": {**RESPONSE_OBJECT, "text/event-stream": RESPONSE_EVENT},
            "headers": {"X-Request-Id": REQUEST_ID, **RATE_LIMIT_HEADERS},
        },
        **error_responses(
            400,
            404,
            413,
            429,
            500,
            503,
            e400="Invalid request (`param` names the field), or the input does not fit the model's context "
            "(`context_length_exceeded`).",
            e404="No live worker serves the model (`model_not_found`), or `previous_response_id` names no stored "
            "response (`previous_response_not_found`).",
            e500="The response failed in the engine (`engine_error`, `worker_lost`).",
        ),
    },
)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    responses: ResponsesDep,
    settings: SettingsDep,
    caller: PrincipalDep,
) -> Any:
    return await create(responses, body, request, settings, caller)  # type: ignore[arg-type]


@router.get(
    "/v1/responses/{response_id}",
    response_model=None,
    responses={
        200: {
            "description": "The `response` (its output so far); with `stream=true`, its events from the start "
            "or after `starting_after`, then live until its end. " + STREAM_DESCRIPTION,
            "content": {**RESPONSE_OBJECT, "text/event-stream": RESPONSE_EVENT},
            "headers": {"X-Request-Id": REQUEST_ID},
        },
        **error_responses(400, 404, 503, e400="`stream` or `starting_after` (an event number, -1 up) is invalid."),
    },
)
async def retrieve_response(
    response_id: str,
    responses: ResponsesDep,
    settings: SettingsDep,
    caller: PrincipalDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1, le=MAX_CURSOR)] = None,
    include: Annotated[list[str] | None, Query(alias="include[]")] = None,
) -> Any:
    """A stored response; with `stream=true`, its stream replayed (from after
    `starting_after`) and followed live. Leaving never cancels it."""
    if not stream:
        return JSONResponse(await responses.get(response_id, caller))
    job, _ = await responses.view(response_id, caller, stored=True)
    count_resume(job.model)  # metrics (issue 9)
    shutdown = anyio.Event()
    after = -1 if starting_after is None else starting_after
    events = responses.stream(job, after=after, shutdown=shutdown)
    return sse(settings, job, events, shutdown, ping=settings.sse_ping_seconds)


@router.post(
    "/v1/responses/{response_id}/cancel",
    response_model=None,
    responses={
        200: {"description": "The response, cancelled (or as it ended).", "content": RESPONSE_OBJECT},
        **error_responses(404, 503),
    },
)
async def cancel_response(response_id: str, responses: ResponsesDep, caller: PrincipalDep) -> Any:
    """Cancel a response. Idempotent: one that has ended comes back as it is."""
    return JSONResponse(await responses.cancel(response_id, caller))


@router.delete(
    "/v1/responses/{response_id}",
    response_model=None,
    responses={
        200: {
            "description": "`{id, object: response, deleted: true}`",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **error_responses(404, 503),
    },
)
async def delete_response(response_id: str, responses: ResponsesDep, caller: PrincipalDep) -> Any:
    """Delete a stored response (a running one is cancelled first)."""
    return JSONResponse(await responses.delete(response_id, caller))


@router.get(
    "/v1/responses/{response_id}/input_items",
    response_model=None,
    responses={
        200: {
            "description": "A list of the response's input items.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **error_responses(
            400,
            404,
            503,
            e400="`limit` or `order` is invalid, or `after` / `before` names no input item of the response.",
        ),
    },
)
async def list_input_items(
    response_id: str,
    responses: ResponsesDep,
    caller: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    before: str | None = None,
) -> Any:
    return JSONResponse(await responses.input_items(response_id, caller, limit, order, after, before))
