"""Completion jobs (`/v1/completions`, as `vllm serve` answers it): create, read, follow
(resumable SSE) and cancel, like chat completion jobs (api.routes.chat)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import CompletionsDep, PrincipalDep, SettingsDep
from api.jobs.reader import MAX_CURSOR
from api.openapi import RATE_LIMIT_HEADERS, REQUEST_ID, error_responses, sse_event
from api.routes.chat import CURSOR, create, resume
from common.schemas import Completion, CompletionJob, CompletionRequest

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=Completion | CompletionJob,
    responses={
        200: {
            "description": "A `text_completion`; with `background`, the queued job; with `stream`, an SSE stream "
            "of `text_completion` chunks (`data:` lines only, each chunk with its `seq`) ending with "
            "`data: [DONE]`.",
            "content": {"text/event-stream": sse_event("CompletionChunk")},
            "headers": {"X-Request-Id": REQUEST_ID, **RATE_LIMIT_HEADERS},
        },
        **error_responses(
            400,
            404,
            413,
            429,
            500,
            503,
            e400="Invalid request (`param` names the field), or a prompt does not fit the model's context "
            "(`context_length_exceeded`).",
            e404="No live worker serves the model (`model_not_found`).",
            e500="The job failed in the engine (`engine_error`, `worker_lost`).",
        ),
    },
)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    completions: CompletionsDep,
    settings: SettingsDep,
    caller: PrincipalDep,
) -> Any:
    return await create(completions, body, request, settings, caller)


@router.get("/v1/completions/{completion_id}", responses=error_responses(404, 503))
async def get_completion(completion_id: str, completions: CompletionsDep, caller: PrincipalDep) -> CompletionJob:
    """The job: status and times; once it ended, its choices and usage."""
    return JSONResponse(await completions.get(completion_id, caller))  # type: ignore[return-value]


@router.get(
    "/v1/completions/{completion_id}/stream",
    response_model=None,
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "The job's SSE stream of `text_completion` chunks, ending with `data: [DONE]`.",
            "content": {"text/event-stream": sse_event("CompletionChunk")},
            "headers": {"X-Request-Id": REQUEST_ID},
        },
        **error_responses(400, 404, 503, e400="`starting_after` or `Last-Event-ID` is not an event id."),
    },
)
async def stream_completion(
    completion_id: str,
    completions: CompletionsDep,
    settings: SettingsDep,
    caller: PrincipalDep,
    starting_after: Annotated[int | None, Query(ge=-1, le=MAX_CURSOR)] = None,
    last_event_id: Annotated[
        str | None,
        Header(description="Resume after this event id (-1: from the start).", json_schema_extra={"pattern": CURSOR}),
    ] = None,
) -> Any:
    """Replay the job's stream from the start, or from after `starting_after` / the
    `Last-Event-ID` header, then follow it live until `[DONE]`. Leaving never cancels."""
    return await resume(completions, completion_id, settings, caller, starting_after, last_event_id)


@router.post(
    "/v1/completions/{completion_id}/cancel",
    responses=error_responses(404, 409, 503, e409="The job has already completed or failed."),
)
async def cancel_completion(completion_id: str, completions: CompletionsDep, caller: PrincipalDep) -> CompletionJob:
    return JSONResponse(await completions.cancel(completion_id, caller))  # type: ignore[return-value]
