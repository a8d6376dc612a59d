"""ChatAdapter: `/v1/chat/completions` on the job pipeline. It turns a chat request into
a job record (template, prompt tokens, sampling, limits: every client error is raised
before anything is queued), and a job's events into OpenAI responses: a
`chat.completion`, a stream of `chat.completion.chunk`s (live or resumed from any
point), or the job's state.
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
from redis.exceptions import RedisError

from api.auth import Principal
from api.catalog import ModelCatalog
from api.jobs.pipeline import JobConflictError, JobNotFoundError, JobPipeline
from api.limits import check_chat_limits
from api.metrics import RequestTimer, observe_queue_wait
from api.relay import StreamClosed, Subscription
from common import keys
from common.errors import (
    ContextLengthError,
    InvalidRequestError,
    RateLimitError,
    ServiceError,
    ServiceUnavailableError,
)
from common.jobs import JobOptions, JobRecord, JobRequest, JobStatus, SamplingSpec, new_job_id
from common.logs import log_event
from common.schemas import (
    ChatCompletion,
    ChatCompletionJob,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    Usage,
)
from common.settings import Settings

DONE = "[DONE]"
log = logging.getLogger(__name__)


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


def _choices(record: JobRecord) -> list[Choice]:
    if record.result is None:
        return []
    return [
        Choice(
            index=c.index,
            message=ChatCompletionMessage(content=c.text),
            finish_reason=c.finish_reason,  # type: ignore[arg-type]
        )
        for c in record.result.choices
    ]


def job_object(record: JobRecord) -> ChatCompletionJob:
    """A job as `GET /v1/chat/completions/{id}` shows it."""
    return ChatCompletionJob(
        id=record.id,
        created=int(record.created),
        model=record.model,
        status=record.status.value,  # type: ignore[arg-type]
        background=record.options.background,
        attempt=record.attempt,
        started_at=int(record.started) if record.started else None,
        finished_at=int(record.finished) if record.finished else None,
        choices=_choices(record),
        usage=record.usage,
        error=record.error,
    )


def completion_object(record: JobRecord) -> ChatCompletion:
    """An ended job as a plain `chat.completion`."""
    usage = record.usage or Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    return ChatCompletion(
        id=record.id, created=int(record.created), model=record.model, choices=_choices(record), usage=usage
    )


class ChatAdapter:
    def __init__(self, settings: Settings, pipeline: JobPipeline, catalog: ModelCatalog):
        self.settings = settings
        self.pipeline = pipeline
        self.catalog = catalog

    # -- creating ---------------------------------------------------------------------

    async def prepare(self, req: ChatCompletionRequest, job_id: str | None = None, owner: str = "") -> JobRecord:
        """Validate a request and turn it into a job record (not yet stored). Every client
        error is raised here."""
        if req.n > self.settings.max_n:
            raise InvalidRequestError(f"n must be at most {self.settings.max_n}", param="n")
        # Messages, their text and n × max_tokens, before anything is tokenized.
        choice_max_tokens = check_chat_limits(req, self.settings)
        try:
            card, tokenizer = await self.catalog.get(req.model)
        except RedisError as exc:
            raise ServiceUnavailableError("cannot reach Redis") from exc
        messages = [m.for_template() for m in req.messages]
        prompt_ids = await asyncio.to_thread(tokenizer.encode_chat, messages)
        max_tokens = min(resolve_max_tokens(req, len(prompt_ids), card.max_model_len), choice_max_tokens)
        sampling = sampling_from_request(req, max_tokens)
        return JobRecord(
            id=job_id or new_job_id(),
            model=req.model,
            owner=owner,
            request=JobRequest(prompt_token_ids=prompt_ids, sampling=sampling),
            options=JobOptions(stream=req.stream, include_usage=req.include_usage, background=req.background),
        )

    async def submit(
        self, req: ChatCompletionRequest, caller: Principal
    ) -> tuple[JobView, Subscription | None, dict[str, str]]:
        """Count, validate, admit, record and queue a request: its view, its channel's
        subscription (unless it runs in the background without a stream) and the
        rate-limit headers its response carries."""
        try:
            headers = await self.pipeline.admission.count_request(caller)
            await self.pipeline.look(req.model, headers)
            record = await self.prepare(req, owner=caller.key_id)
            view = JobView(record.id, req.model, int(record.created), req.n, req.include_usage, req.background)
            # Logs (issue 9): the prompt goes in `job.created` only with LOG_PROMPTS=true.
            prompt = {"messages": [m.for_template() for m in req.messages]} if self.settings.log_prompts else None
            subscription = await self.pipeline.submit(
                record, follow=req.stream or not req.background, headers=headers, log_fields=prompt
            )
        except RateLimitError as exc:
            # Logs (issue 9): a 429, nothing written (the job never existed).
            log_event(
                log,
                "job.refused",
                model=req.model,
                key_id=caller.key_id or None,
                status=exc.status_code,
                reason=exc.code,
                retry_after=exc.headers.get("retry-after"),
                message=exc.message,
            )
            raise
        return view, subscription, headers

    # -- reading ----------------------------------------------------------------------

    async def view(self, job_id: str, caller: Principal) -> tuple[JobView, JobRecord]:
        """The job, if `caller` may see it (another key's job does not exist for it)."""
        record = await self.pipeline.get(job_id)
        if record is None or not caller.owns(record.owner):
            raise JobNotFoundError(f"No chat completion job found with id '{job_id}'.", param="completion_id")
        n = record.request.sampling.n if record.request else 1
        return JobView(
            record.id, record.model, int(record.created), n, record.options.include_usage, record.options.background
        ), record

    async def stream(
        self,
        job: JobView,
        subscription: Subscription | None = None,
        after: int = -1,
        cancel_on_disconnect: bool = False,
        shutdown: anyio.Event | None = None,
        timer: RequestTimer | None = None,
    ) -> AsyncIterator[dict[str, str]]:
        """SSE events (`data`, `id`) ending with `[DONE]`. Each event's `id` is the job
        event's seq, so `Last-Event-ID` resumes exactly after it. Leaving an ordinary
        stream cancels its job; a server shutting down (`shutdown` set) does not: the
        client resumes on another API process. `timer`: the request that created the job
        (not a resumed stream) times what its client sees (api.metrics)."""
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
                async for event in self.pipeline.follow(job.id, after, subscription):
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
                            if timer is not None and any(c.text for c in event.choices):
                                timer.content_sent()  # metrics: sent (the next one is asked for)
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
            finished = True
            yield {"data": DONE}
            if timer is not None:
                timer.ended()  # metrics: [DONE] sent
        finally:
            leaving = not finished and cancel_on_disconnect and not (shutdown is not None and shutdown.is_set())
            if leaving:
                with anyio.CancelScope(shield=True):
                    await self.pipeline.cancel(job.id, quiet=True, source="disconnect")
            if timer is not None:
                with anyio.CancelScope(shield=True):
                    await self.observe_queue_wait(job)

    async def collect(self, job: JobView, subscription: Subscription | None, caller: Principal) -> ChatCompletion:
        """Wait for the job to end; the `chat.completion`. If the caller goes away first
        (the task is cancelled), the job is cancelled."""
        finished = False
        try:
            async for event in self.pipeline.follow(job.id, -1, subscription):
                if event.kind == "error":
                    finished = True
                    raise ServiceError.from_dict(event.error or {})
                if event.kind == "done":
                    finished = True
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.observe_queue_wait(job)  # metrics (issue 9)
            raise
        finally:
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self.pipeline.cancel(job.id, quiet=True, source="disconnect")
        _, record = await self.view(job.id, caller)
        observe_queue_wait(job.model, record.created, record.started)  # metrics, from the record read anyway
        return completion_object(record)

    async def observe_queue_wait(self, job: JobView) -> None:
        """Metrics: the job's queue wait (created -> started) from its record, once the
        request following it is done with it (nothing if it never started)."""
        try:
            created, started = await self.pipeline.redis.hmget(keys.job(job.id), ["created", "started"])
        except RedisError:
            return
        observe_queue_wait(job.model, created, started)

    async def get(self, job_id: str, caller: Principal) -> ChatCompletionJob:
        _, record = await self.view(job_id, caller)
        return job_object(record)

    # -- cancelling -------------------------------------------------------------------

    async def cancel(self, job_id: str, caller: Principal) -> ChatCompletionJob:
        """Cancel a job and answer with it (a running one ends within an engine step or two)."""
        await self.view(job_id, caller)
        before = await self.pipeline.cancel(job_id, source="client")
        if before == "missing":
            raise JobNotFoundError(f"No chat completion job found with id '{job_id}'.", param="completion_id")
        if before in (JobStatus.completed.value, JobStatus.failed.value):
            raise JobConflictError(f"Job '{job_id}' has already ended ({before}); it cannot be cancelled.")
        deadline = time.monotonic() + 3.0
        _, record = await self.view(job_id, caller)
        while not record.status.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            _, record = await self.view(job_id, caller)
        return job_object(record)
