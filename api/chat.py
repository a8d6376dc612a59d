"""ChatService: turns a chat request into a queued job, and a job's events into OpenAI
responses: a `chat.completion`, a stream of `chat.completion.chunk`s (live or resumed
from any point), or the job's state.

Reading a job (`follow`) combines the live channel with the job's replay log: it
subscribes first, then replays from the log what the reader has not seen, then follows
the channel, dropping what it already delivered and filling any gap from the log. So a
late or reconnecting reader, or one whose events were dropped by pub/sub, still gets
every event exactly once, in order.
"""

from __future__ import annotations

import asyncio
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
from api.relay import StreamClosed, StreamRelay, Subscription
from common import keys
from common.errors import (
    ContextLengthError,
    InvalidRequestError,
    NotFoundError,
    ServiceError,
    ServiceUnavailableError,
)
from common.job_queue import JobQueue
from common.jobs import (
    ChunkEvent,
    JobOptions,
    JobRecord,
    JobRequest,
    JobStatus,
    SamplingSpec,
    new_job_id,
)
from common.jobstore import JobStore
from common.schemas import ChatCompletionRequest, Usage
from common.settings import Settings

log = logging.getLogger(__name__)
DONE = "[DONE]"
# With no event for this long, a reader checks the job still exists and catches up from its log.
IDLE_CHECK_SECONDS = 5.0


class JobNotFoundError(NotFoundError):
    default_code = "job_not_found"


class JobConflictError(ServiceError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "job_not_cancellable"


@dataclass
class JobView:
    """What a reader needs to render a job's events."""

    id: str
    model: str
    created: int
    n: int
    include_usage: bool
    background: bool


def sampling_from_request(req: ChatCompletionRequest, max_tokens: int) -> SamplingSpec:
    spec = SamplingSpec(
        n=req.n, max_tokens=max_tokens, stop=req.stop, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens
    )
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
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


def chunk_json(job: JobView, choices: list[dict[str, Any]], usage: Usage | None = None, attempt: int = 1) -> str:
    body: dict[str, Any] = {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage.model_dump() if usage is not None else None,
    }
    if attempt > 1:
        body["attempt"] = attempt  # the worker was lost; a new attempt continues the answer
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def job_object(record: JobRecord) -> dict[str, Any]:
    """A job as `GET /v1/chat/completions/{id}` shows it: a `chat.completion` (choices
    and usage once it has ended) with the job's status and times."""
    choices = []
    if record.result is not None:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for c in record.result.choices
        ]
    return {
        "id": record.id,
        "object": "chat.completion",
        "created": int(record.created),
        "model": record.model,
        "status": record.status.value,
        "background": record.options.background,
        "attempt": record.attempt,
        "started_at": int(record.started) if record.started else None,
        "finished_at": int(record.finished) if record.finished else None,
        "choices": choices,
        "usage": record.usage.model_dump() if record.usage else None,
        "error": record.error,
    }


JOB_ONLY_FIELDS = ("status", "background", "attempt", "started_at", "finished_at", "error")


def completion_object(record: JobRecord) -> dict[str, Any]:
    """An ended job as a plain `chat.completion` (without the job's own fields)."""
    body = job_object(record)
    for name in JOB_ONLY_FIELDS:
        body.pop(name)
    return body


class ChatService:
    def __init__(
        self, settings: Settings, redis: aioredis.Redis, relay: StreamRelay, catalog: ModelCatalog, queue: JobQueue
    ):
        self.settings = settings
        self.redis = redis
        self.store = JobStore(redis, settings.job_ttl_seconds)
        self.relay = relay
        self.catalog = catalog
        self.queue = queue

    # -- creating ---------------------------------------------------------------------

    async def prepare(self, req: ChatCompletionRequest, job_id: str | None = None) -> JobRecord:
        """Validate a request and turn it into a job record (not yet stored). Every client
        error is raised here."""
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

        return JobRecord(
            id=job_id or new_job_id(),
            model=req.model,
            request=JobRequest(prompt_token_ids=prompt_ids, sampling=sampling),
            options=JobOptions(stream=req.stream, include_usage=req.include_usage, background=req.background),
        )

    async def submit(self, req: ChatCompletionRequest) -> tuple[JobView, Subscription | None]:
        """Validate, record and queue a request, raising every client error before anything
        is queued. Unless it runs in the background, the job's channel is already subscribed
        when the job is queued (so no first events are missed)."""
        record = await self.prepare(req)
        view = JobView(record.id, req.model, int(record.created), req.n, req.include_usage, req.background)
        subscription = None
        if req.stream or not req.background:
            subscription = await self.relay.subscribe(keys.job_channel(record.id))
        try:
            await self.store.create(record)
            await self.queue.submit(record.id, req.model)
        except BaseException as exc:
            if subscription is not None:
                await self.relay.unsubscribe(subscription)
            if isinstance(exc, RedisError):
                raise ServiceUnavailableError("cannot reach Redis") from exc
            raise
        return view, subscription

    # -- reading ----------------------------------------------------------------------

    async def view(self, job_id: str) -> tuple[JobView, JobRecord]:
        record = await self.store.get(job_id)
        if record is None:
            raise JobNotFoundError(f"No chat completion job found with id '{job_id}'.", param="completion_id")
        n = record.request.sampling.n if record.request else 1
        return JobView(
            record.id, record.model, int(record.created), n, record.options.include_usage, record.options.background
        ), record

    async def follow(
        self, job_id: str, after: int = -1, subscription: Subscription | None = None
    ) -> AsyncIterator[ChunkEvent]:
        """Every event of the job after seq `after`, each once and in order, up to and
        including its last (`done` or `error`)."""
        channel = keys.job_channel(job_id)
        sub = subscription or await self.relay.subscribe(channel)
        next_seq = after + 1
        try:
            while True:
                # Catch up from the replay log.
                for event in await self.store.log(job_id, next_seq):
                    yield event
                    next_seq = event.seq + 1
                    if event.kind != "delta":
                        return
                # Then follow the channel until it has nothing (gap, interruption, silence).
                while True:
                    try:
                        # asyncio.timeout, not wait_for: no extra task per event on the token path.
                        async with asyncio.timeout(IDLE_CHECK_SECONDS):
                            event = await sub.get()
                    except TimeoutError:
                        if not await self.redis.exists(keys.job(job_id)):
                            raise StreamClosed(
                                "the job no longer exists (expired, or Redis lost it)", code="job_lost"
                            ) from None
                        break
                    except StreamClosed as exc:
                        if exc.code == "slow_consumer":
                            raise
                        # The shared connection dropped: listen again, then catch up from the log.
                        sub = await self.relay.subscribe(channel)
                        if not await self.redis.exists(keys.job(job_id)):
                            raise StreamClosed(
                                "the stream was cut: Redis lost the job", code="stream_interrupted"
                            ) from exc
                        break
                    if event.seq < next_seq:
                        continue
                    if event.seq > next_seq:
                        break  # missed some: the log has them
                    yield event
                    next_seq += 1
                    if event.kind != "delta":
                        return
        finally:
            await self._unsubscribe(sub)

    async def stream(
        self,
        job: JobView,
        subscription: Subscription | None = None,
        after: int = -1,
        cancel_on_disconnect: bool = False,
    ) -> AsyncIterator[dict[str, str]]:
        """SSE events (`data`, `id`) ending with `[DONE]`. Each event's `id` is the job
        event's seq, so `Last-Event-ID` resumes exactly after it."""
        finished = False
        try:
            if after < 0:
                role = {"role": "assistant", "content": ""}
                yield {
                    "data": chunk_json(
                        job,
                        [{"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(job.n)],
                    )
                }
            sent_content_in: int | None = None  # the attempt whose text the client has
            try:
                async for event in self.follow(job.id, after, subscription):
                    if event.kind == "delta":
                        if job.n > 1 and sent_content_in is not None and event.attempt != sent_content_in:
                            raise StreamClosed(
                                "the worker running this job was lost and the job restarted; its stream cannot "
                                f"continue without repeating text. Fetch the result: GET /v1/chat/completions/{job.id}",
                                code="worker_lost",
                            )
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
                            sent_content_in = event.attempt
                            yield {"data": chunk_json(job, choices, attempt=event.attempt), "id": str(event.seq)}
                    elif event.kind == "done":
                        finished = True
                        # Ends that came with no delta (cancelled while queued, or by the reaper).
                        tail: list[dict[str, Any]] = [
                            {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
                            for c in event.choices
                            if c.finish_reason
                        ]
                        if tail:
                            yield {"data": chunk_json(job, tail, attempt=event.attempt)}
                        if job.include_usage and event.usage is not None:
                            yield {
                                "data": chunk_json(job, [], event.usage, attempt=event.attempt),
                                "id": str(event.seq),
                            }
                    else:
                        finished = True
                        yield {
                            "data": json.dumps(ServiceError.from_dict(event.error or {}).to_dict()),
                            "id": str(event.seq),
                        }
            except ServiceError as exc:
                finished = True
                yield {"data": json.dumps(exc.to_dict())}
            except RedisError:
                finished = True
                yield {"data": json.dumps(ServiceUnavailableError("lost the connection to Redis mid-stream").to_dict())}
            yield {"data": DONE}
        finally:
            if not finished and cancel_on_disconnect:
                with anyio.CancelScope(shield=True):
                    await self.cancel(job.id, quiet=True)

    async def collect(self, job: JobView, subscription: Subscription | None) -> dict[str, Any]:
        """Wait for the job to end; the `chat.completion`. If the caller goes away first
        (the task is cancelled), the job is cancelled."""
        finished = False
        try:
            async for event in self.follow(job.id, -1, subscription):
                if event.kind == "error":
                    finished = True
                    raise ServiceError.from_dict(event.error or {})
                if event.kind == "done":
                    finished = True
        finally:
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self.cancel(job.id, quiet=True)
        _, record = await self.view(job.id)
        return completion_object(record)

    async def get(self, job_id: str) -> dict[str, Any]:
        _, record = await self.view(job_id)
        return job_object(record)

    # -- cancelling -------------------------------------------------------------------

    async def cancel(self, job_id: str, quiet: bool = False) -> dict[str, Any] | None:
        """Cancel a job: a queued one never starts; a running one is aborted by its worker
        (announced at once, and flagged in the record in case the announcement is missed)."""
        try:
            before = await self.store.cancel(job_id)
            if before == "queued":
                record = await self.store.get(job_id)
                if record is not None:
                    await self.store.end_stream(record)
            elif before == "in_progress":
                await self.redis.publish(keys.CANCEL_CHANNEL, job_id)
        except RedisError:
            if quiet:
                log.warning("could not cancel %s: Redis unreachable", job_id)
                return None
            raise
        if quiet:
            return None
        if before == "missing":
            raise JobNotFoundError(f"No chat completion job found with id '{job_id}'.", param="completion_id")
        if before in (JobStatus.completed.value, JobStatus.failed.value):
            raise JobConflictError(f"Job '{job_id}' has already ended ({before}); it cannot be cancelled.")
        # A running job ends within an engine step or two; answer with its final state.
        deadline = time.monotonic() + 3.0
        record = None
        while time.monotonic() < deadline:
            _, record = await self.view(job_id)
            if record.status.terminal:
                break
            await asyncio.sleep(0.05)
        assert record is not None
        return job_object(record)

    async def _unsubscribe(self, sub: Subscription) -> None:
        with anyio.CancelScope(shield=True):
            await self.relay.unsubscribe(sub)
