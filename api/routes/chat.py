"""Chat completion jobs: create, read, follow (resumable SSE) and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse

from api.deps import ChatDep, SettingsDep
from api.endpoints.chat import JobView
from api.jobs.reader import MAX_CURSOR, parse_cursor
from common.schemas import ChatCompletion, ChatCompletionJob, ChatCompletionRequest
from common.settings import Settings

router = APIRouter()


def sse(settings: Settings, job: JobView, events: AsyncIterator[dict[str, str]], shutdown: anyio.Event) -> Any:
    return EventSourceResponse(
        events,
        ping=int(settings.sse_ping_seconds),
        sep="\n",
        headers={"X-Request-Id": job.id},
        # A client that stops reading for this long is cut off (its buffer is bounded too).
        send_timeout=settings.sse_send_timeout_seconds,
        # Set when the server shuts down: the stream ends without cancelling its job.
        shutdown_event=shutdown,
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion | ChatCompletionJob,
    responses={200: {"content": {"text/event-stream": {}}, "description": "a completion, a job, or an SSE stream"}},
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, chat: ChatDep, settings: SettingsDep
) -> Any:
    job, subscription = await chat.submit(body)
    if body.stream:
        # A background job outlives its client; an ordinary one is cancelled when it leaves.
        shutdown = anyio.Event()
        events = chat.stream(job, subscription, cancel_on_disconnect=not body.background, shutdown=shutdown)
        return sse(settings, job, events, shutdown)
    if body.background:
        return await chat.get(job.id)
    # Nothing is sent until the end, so watch for the client leaving meanwhile.
    collecting = asyncio.create_task(chat.collect(job, subscription))
    while True:
        done, _ = await asyncio.wait({collecting}, timeout=1.0)
        if done:
            return collecting.result()
        if await request.is_disconnected():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")


@router.get("/v1/chat/completions/{completion_id}")
async def get_chat_completion(completion_id: str, chat: ChatDep) -> ChatCompletionJob:
    """The job: status and times; once it ended, its choices and usage."""
    return await chat.get(completion_id)


@router.get(
    "/v1/chat/completions/{completion_id}/stream",
    response_model=None,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the job's SSE stream"}},
)
async def stream_chat_completion(
    completion_id: str,
    chat: ChatDep,
    settings: SettingsDep,
    starting_after: Annotated[int | None, Query(ge=-1, le=MAX_CURSOR)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """Replay the job's stream from the start, or from after `starting_after` / the
    `Last-Event-ID` header, then follow it live until `[DONE]`. Leaving never cancels."""
    after = parse_cursor(last_event_id, "Last-Event-ID")
    if starting_after is not None:
        after = starting_after
    job, _ = await chat.view(completion_id)
    shutdown = anyio.Event()
    return sse(settings, job, chat.stream(job, after=after, shutdown=shutdown), shutdown)


@router.post("/v1/chat/completions/{completion_id}/cancel")
async def cancel_chat_completion(completion_id: str, chat: ChatDep) -> ChatCompletionJob:
    return await chat.cancel(completion_id)
