"""`POST /v1/chat/completions`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from api.deps import ChatServiceDep, SettingsDep
from common.schemas import ChatCompletion, ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: ChatServiceDep, settings: SettingsDep
) -> ChatCompletion | EventSourceResponse:
    job = await service.submit(body)
    if body.stream:
        return EventSourceResponse(
            service.stream(job, body),
            ping=int(settings.sse_ping_seconds),
            sep="\n",
            headers={"X-Request-Id": job.id},
        )
    # Non-streaming: nothing is sent until the end, so watch for the client leaving.
    collecting = asyncio.create_task(service.collect(job))
    while True:
        done, _ = await asyncio.wait({collecting}, timeout=1.0)
        if done:
            return collecting.result()
        if await request.is_disconnected():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")
