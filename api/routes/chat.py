"""Chat completion jobs: create, read, follow (resumable SSE) and cancel. The helpers
(`create`, `resume`) serve `/v1/completions` too (api.routes.completions)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Principal
from api.deps import ChatDep, PrincipalDep, SettingsDep
from api.endpoints.chat import JobAdapter, JobView
from api.jobs.reader import MAX_CURSOR, parse_cursor
from api.metrics import RequestTimer, arrived_at, count_resume
from api.openapi import RATE_LIMIT_HEADERS, REQUEST_ID, error_responses, sse_event
from common import timing
from common.schemas import ChatCompletion, ChatCompletionJob, ChatCompletionRequest, CompletionRequest
from common.settings import Settings

router = APIRouter()

# Event ids `parse_cursor` takes: -1, or 0 up to MAX_CURSOR (2**53); 15 digits stay under it.
CURSOR = r"^(-1|[0-9]{1,15})$"
SSE_SEP = "\n"


def written_together(batches: AsyncGenerator[list[dict[str, str]], None]) -> AsyncIterator[bytes]:
    """Each batch of SSE events (`JobAdapter.stream_batches`) as one write: the bytes
    sse_starlette would write for each event, joined (fewer sends through the middleware
    and the socket; the same stream)."""

    async def gen() -> AsyncIterator[bytes]:
        try:
            async for batch in batches:
                yield b"".join(
                    ServerSentEvent(item["data"], id=item.get("id"), event=item.get("event"), sep=SSE_SEP).encode()
                    for item in batch
                )
        finally:
            with anyio.CancelScope(shield=True):
                await batches.aclose()

    return gen()


def sse(
    settings: Settings,
    job: JobView,
    events: AsyncIterator[dict[str, str]] | AsyncIterator[bytes],
    shutdown: anyio.Event,
    headers: dict[str, str] | None = None,
    ping: float = 0,
) -> Any:
    """An SSE response; `ping`: seconds between keep-alive comments (0: none)."""
    response = EventSourceResponse(
        events,
        ping=ping,
        sep=SSE_SEP,
        headers={"X-Request-Id": job.id, **(headers or {})},
        # A client that stops reading for this long is cut off (its buffer is bounded too).
        send_timeout=settings.sse_send_timeout_seconds,
        # Set when the server shuts down: the stream ends without cancelling its job.
        shutdown_event=shutdown,
    )
    # sse_starlette sends the response's end (and each keep-alive comment) holding an
    # anyio Lock, whose acquire always yields to the event loop: the end of every stream
    # waited behind a whole lap of the loop's other work, 12 ms at the median at 32
    # streams on the real engine (issue 12). asyncio's Lock yields only when it is held.
    response._send_lock = asyncio.Lock()  # type: ignore[assignment]
    return response


async def create(
    adapter: JobAdapter,
    body: ChatCompletionRequest | CompletionRequest,
    request: Request,
    settings: Settings,
    caller: Principal,
) -> Any:
    job, subscription, headers = await adapter.submit(body, caller)  # type: ignore[attr-defined]
    # Metrics (issue 9): what the client sees, from the request's arrival (api/metrics.py).
    timer = RequestTimer(job.model, arrived_at(request.scope))
    if timing.ENABLED:
        timing.stamp(job.id, "arrived", timing.epoch_of(timer.arrived))
    if body.stream:
        # A background job outlives its client; an ordinary one is cancelled when it leaves.
        shutdown = anyio.Event()
        events = written_together(
            adapter.stream_batches(
                job, subscription, cancel_on_disconnect=not body.background, shutdown=shutdown, timer=timer
            )
        )
        # No keep-alive comments unless configured: OpenAI and vLLM send none, and naive
        # parsers (vLLM's benchmark client) lose the event a comment lands next to.
        return sse(settings, job, events, shutdown, headers, ping=settings.sse_create_ping_seconds)
    headers = {**headers, "X-Request-Id": job.id}
    if body.background:
        return JSONResponse(await adapter.get(job.id, caller), headers=headers)
    # Nothing is sent until the end, so watch for the client leaving meanwhile.
    collecting = asyncio.create_task(adapter.collect(job, subscription, caller))
    while True:
        done, _ = await asyncio.wait({collecting}, timeout=1.0)
        if done:
            timer.ended()  # metrics: the job's end is in (the completion, or its error)
            return JSONResponse(collecting.result(), headers=headers)
        if await request.is_disconnected():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")


async def resume(
    adapter: JobAdapter,
    completion_id: str,
    settings: Settings,
    caller: Principal,
    starting_after: int | None,
    last_event_id: str | None,
) -> Any:
    after = parse_cursor(last_event_id, "Last-Event-ID")
    if starting_after is not None:
        after = starting_after
    job, _ = await adapter.view(completion_id, caller)
    count_resume(job.model)  # metrics (issue 9)
    shutdown = anyio.Event()
    events = written_together(adapter.stream_batches(job, after=after, shutdown=shutdown, with_ids=True))
    return sse(settings, job, events, shutdown, ping=settings.sse_ping_seconds)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion | ChatCompletionJob,
    responses={
        200: {
            "description": "A `chat.completion`; with `background`, the queued job; with `stream`, an SSE "
            "stream of `chat.completion.chunk`s (`data:` lines only, each chunk with its `seq`) ending with "
            "`data: [DONE]`.",
            "content": {"text/event-stream": sse_event("ChatCompletionChunk")},
            "headers": {"X-Request-Id": REQUEST_ID, **RATE_LIMIT_HEADERS},
        },
        **error_responses(
            400,
            404,
            413,
            429,
            500,
            503,
            e400="Invalid request (`param` names the field), or the prompt does not fit the model's context "
            "(`context_length_exceeded`).",
            e404="No live worker serves the model (`model_not_found`).",
            e500="The job failed in the engine (`engine_error`, `worker_lost`).",
        ),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    chat: ChatDep,
    settings: SettingsDep,
    caller: PrincipalDep,
) -> Any:
    return await create(chat, body, request, settings, caller)


@router.get("/v1/chat/completions/{completion_id}", responses=error_responses(404, 503))
async def get_chat_completion(completion_id: str, chat: ChatDep, caller: PrincipalDep) -> ChatCompletionJob:
    """The job: status and times; once it ended, its choices and usage."""
    return JSONResponse(await chat.get(completion_id, caller))  # type: ignore[return-value]


@router.get(
    "/v1/chat/completions/{completion_id}/stream",
    response_model=None,
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "The job's SSE stream of `chat.completion.chunk`s, ending with `data: [DONE]`.",
            "content": {"text/event-stream": sse_event("ChatCompletionChunk")},
            "headers": {"X-Request-Id": REQUEST_ID},
        },
        **error_responses(400, 404, 503, e400="`starting_after` or `Last-Event-ID` is not an event id."),
    },
)
async def stream_chat_completion(
    completion_id: str,
    chat: ChatDep,
    settings: SettingsDep,
    caller: PrincipalDep,
    starting_after: Annotated[int | None, Query(ge=-1, le=MAX_CURSOR)] = None,
    last_event_id: Annotated[
        str | None,
        Header(description="Resume after this event id (-1: from the start).", json_schema_extra={"pattern": CURSOR}),
    ] = None,
) -> Any:
    """Replay the job's stream from the start, or from after `starting_after` / the
    `Last-Event-ID` header, then follow it live until `[DONE]`. Each event carries its
    sequence number as its SSE `id` (and as `seq` in its chunk). Leaving never cancels."""
    return await resume(chat, completion_id, settings, caller, starting_after, last_event_id)


@router.post(
    "/v1/chat/completions/{completion_id}/cancel",
    responses=error_responses(404, 409, 503, e409="The job has already completed or failed."),
)
async def cancel_chat_completion(completion_id: str, chat: ChatDep, caller: PrincipalDep) -> ChatCompletionJob:
    return JSONResponse(await chat.cancel(completion_id, caller))  # type: ignore[return-value]
