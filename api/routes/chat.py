"""`POST /v1/chat/completions`."""

from __future__ import annotations

from fastapi import APIRouter
from sse_starlette import EventSourceResponse

from api.deps import ChatServiceDep, SettingsDep
from common.schemas import ChatCompletion, ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, service: ChatServiceDep, settings: SettingsDep
) -> ChatCompletion | EventSourceResponse:
    job = await service.submit(body)
    if body.stream:
        return EventSourceResponse(
            service.stream(job, body),
            ping=int(settings.sse_ping_seconds),
            sep="\n",
            headers={"X-Request-Id": job.id},
        )
    return await service.collect(job)
