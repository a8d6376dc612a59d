"""ChatService: turns a chat request into a queued job and the job's events into OpenAI
responses (a `chat.completion`, or a stream of `chat.completion.chunk`s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.catalog import ModelCatalog
from api.job_queue import JobQueue
from api.relay import StreamRelay, Subscription
from common import keys
from common.errors import ContextLengthError, InvalidRequestError, ServiceError, ServiceUnavailableError
from common.jobs import ChunkEvent, JobRecord, JobRequest, JobStatus, SamplingSpec, new_job_id
from common.schemas import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    Usage,
)
from common.settings import Settings

log = logging.getLogger(__name__)
DONE = "[DONE]"


@dataclass
class SubmittedJob:
    id: str
    model: str
    created: int
    n: int
    subscription: Subscription


def sampling_from_request(req: ChatCompletionRequest, max_tokens: int) -> SamplingSpec:
    spec = SamplingSpec(n=req.n, max_tokens=max_tokens, stop=req.stop, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            setattr(spec, name, value)
    if spec.top_k == -1:
        spec.top_k = 0  # both mean "no top-k" to clients; the engine takes 0
    if req.min_tokens > max_tokens:
        raise InvalidRequestError("min_tokens must not exceed max_tokens", param="min_tokens")
    return spec


def resolve_max_tokens(req: ChatCompletionRequest, prompt_tokens: int, max_model_len: int) -> int:
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
            param="messages",
        )
    wanted = req.requested_max_tokens
    if wanted is None:
        return room
    if wanted > room:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the "
            f"completion). Please reduce the length of the messages or completion.",
            param=param,
        )
    return wanted


def chunk_json(job: SubmittedJob, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
    return json.dumps(
        {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": usage.model_dump() if usage is not None else None,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


class ChatService:
    def __init__(self, settings: Settings, redis: aioredis.Redis, relay: StreamRelay, catalog: ModelCatalog, queue: JobQueue):
        self.settings = settings
        self.redis = redis
        self.relay = relay
        self.catalog = catalog
        self.queue = queue

    async def submit(self, req: ChatCompletionRequest) -> SubmittedJob:
        """Validate, record and queue a request. Every client error is raised here, before
        anything is queued."""
        if req.n > self.settings.max_n:
            raise InvalidRequestError(f"n must be at most {self.settings.max_n}", param="n")
        try:
            card, tokenizer = await self.catalog.get(req.model)
        except RedisError as exc:
            raise ServiceUnavailableError("cannot reach Redis") from exc
        messages = [m.for_template() for m in req.messages]
        prompt_ids = await asyncio.to_thread(tokenizer.encode_chat, messages)
        max_tokens = resolve_max_tokens(req, len(prompt_ids), card.max_model_len)
        sampling = sampling_from_request(req, max_tokens)

        record = JobRecord(id=new_job_id(), model=req.model, request=JobRequest(prompt_token_ids=prompt_ids, sampling=sampling))
        key = keys.job(record.id)
        subscription = await self.relay.subscribe(keys.job_channel(record.id))
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=record.to_redis())
                pipe.expire(key, self.settings.job_ttl_seconds)
                await pipe.execute()
            await self.queue.submit(record.id, req.model)
        except BaseException as exc:
            await self.relay.unsubscribe(subscription)
            if isinstance(exc, RedisError):
                raise ServiceUnavailableError("cannot reach Redis") from exc
            raise
        return SubmittedJob(id=record.id, model=req.model, created=int(record.created), n=req.n, subscription=subscription)

    async def events(self, job: SubmittedJob) -> AsyncIterator[ChunkEvent]:
        """The job's events up to and including its last (`done` or `error`)."""
        while True:
            event = await job.subscription.get()
            yield event
            if event.kind != "delta":
                return

    async def stream(self, job: SubmittedJob, req: ChatCompletionRequest) -> AsyncIterator[dict[str, str]]:
        """SSE events (`data`, `id`) for a streaming request, ending with `[DONE]`. If the
        client goes away first, the job is cancelled so its batch slot frees up."""
        finished = False
        try:
            yield {"data": chunk_json(job, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(job.n)])}
            try:
                async for event in self.events(job):
                    if event.kind == "delta":
                        choices = [
                            {
                                "index": c.index,
                                "delta": {"content": c.text} if c.text else {},
                                "logprobs": None,
                                "finish_reason": c.finish_reason,
                            }
                            for c in event.choices
                            if c.text or c.finish_reason
                        ]
                        if choices:
                            yield {"data": chunk_json(job, choices), "id": str(event.seq)}
                    elif event.kind == "done":
                        finished = True
                        if req.include_usage and event.usage is not None:
                            yield {"data": chunk_json(job, [], event.usage), "id": str(event.seq)}
                    else:
                        finished = True
                        yield {"data": json.dumps(ServiceError.from_dict(event.error or {}).to_dict()), "id": str(event.seq)}
            except ServiceError as exc:
                finished = True
                yield {"data": json.dumps(exc.to_dict())}
            yield {"data": DONE}
        finally:
            await self._release(job, finished)

    async def collect(self, job: SubmittedJob) -> ChatCompletion:
        texts: dict[int, list[str]] = {i: [] for i in range(job.n)}
        finish: dict[int, str | None] = {i: None for i in range(job.n)}
        usage: Usage | None = None
        finished = False
        try:
            async for event in self.events(job):
                if event.kind == "error":
                    finished = True
                    raise ServiceError.from_dict(event.error or {})
                for c in event.choices:
                    texts.setdefault(c.index, []).append(c.text)
                    if c.finish_reason:
                        finish[c.index] = c.finish_reason
                if event.kind == "done":
                    finished = True
                    usage = event.usage
        finally:
            await self._release(job, finished)
        assert usage is not None
        return ChatCompletion(
            id=job.id,
            created=job.created,
            model=job.model,
            choices=[
                Choice(index=i, message=ChatCompletionMessage(content="".join(texts[i])), finish_reason=finish.get(i))  # type: ignore[arg-type]
                for i in sorted(texts)
            ],
            usage=usage,
        )

    async def _release(self, job: SubmittedJob, finished: bool) -> None:
        """Stop listening; if the job has not finished, the client left: cancel it. Shielded,
        because it mostly runs while the request's task is being cancelled."""
        with anyio.CancelScope(shield=True):
            await self.relay.unsubscribe(job.subscription)
            if not finished:
                await self.cancel(job.id)

    async def cancel(self, job_id: str) -> None:
        """Ask whichever worker holds the job to abort it; a queued job is marked so that
        it never starts."""
        key = keys.job(job_id)
        with contextlib.suppress(RedisError):
            status = await self.redis.hget(key, "status")
            if status is None or JobStatus(status.decode()).terminal:
                return
            if status.decode() == JobStatus.queued.value:
                await self.redis.hset(key, mapping={"status": JobStatus.cancelled.value, "finished": str(time.time())})
            await self.redis.publish(keys.CANCEL_CHANNEL, job_id)
