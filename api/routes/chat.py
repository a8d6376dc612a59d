"""Chat completion jobs: create, read, follow (resumable SSE) and cancel."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse

from api.chat import ChatService, JobView
from api.deps import ChatServiceDep, SettingsDep
from common.errors import InvalidRequestError
from common.schemas import ChatCompletionRequest
from common.settings import Settings

router = APIRouter()


def sse(service: ChatService, settings: Settings, job: JobView, events: Any) -> EventSourceResponse:
    return EventSourceResponse(
        events,
        ping=int(settings.sse_ping_seconds),
        sep="\n",
        headers={"X-Request-Id": job.id},
        # A client that stops reading for this long is cut off (its buffer is bounded too).
        send_timeout=settings.sse_send_timeout_seconds,
    )


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ChatServiceDep, settings: SettingsDep
) -> Any:
    job, subscription = await service.submit(body)
    if body.stream:
        # A background job outlives its client; an ordinary one is cancelled when it leaves.
        events = service.stream(job, subscription, cancel_on_disconnect=not body.background)
        return sse(service, settings, job, events)
    if body.background:
        return await service.get(job.id)
    # Nothing is sent until the end, so watch for the client leaving meanwhile.
    collecting = asyncio.create_task(service.collect(job, subscription))
    while True:
        done, _ = await asyncio.wait({collecting}, timeout=1.0)
        if done:
            return collecting.result()
        if await request.is_disconnected():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")


@router.get("/v1/chat/completions/{completion_id}")
async def get_chat_completion(completion_id: str, service: ChatServiceDep) -> dict[str, Any]:
    """The job: status and times; once it ended, its choices and usage."""
    return await service.get(completion_id)


@router.get("/v1/chat/completions/{completion_id}/stream", response_model=None)
async def stream_chat_completion(
    completion_id: str,
    service: ChatServiceDep,
    settings: SettingsDep,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Replay the job's stream from the start, or from after `starting_after` / the
    `Last-Event-ID` header, then follow it live until `[DONE]`. Leaving never cancels."""
    after = -1
    if last_event_id is not None:
        try:
            after = int(last_event_id)
        except ValueError:
            raise InvalidRequestError(
                "Last-Event-ID must be an event id from this stream", param="Last-Event-ID"
            ) from None
    if starting_after is not None:
        after = starting_after
    job, _ = await service.view(completion_id)
    return sse(service, settings, job, service.stream(job, after=after))


@router.post("/v1/chat/completions/{completion_id}/cancel")
async def cancel_chat_completion(completion_id: str, service: ChatServiceDep) -> dict[str, Any]:
    result = await service.cancel(completion_id)
    assert result is not None
    return result
