"""JobAdapter: an OpenAI endpoint on the job pipeline; ChatAdapter: `/v1/chat/completions`
(`api.endpoints.completions`: `/v1/completions`). A request becomes a job record
(template, prompt tokens, sampling, the worker's OutputSpec, limits: every client error
is raised before anything is queued), and a job's events become OpenAI responses: a
`chat.completion` (`text_completion`), a stream of chunks (live or resumed from any
point; `data:` lines only, each chunk carrying its event's `seq`), or the job's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from redis.exceptions import RedisError

from api.auth import Principal
from api.catalog import ChatTokenizer, ModelCatalog
from api.jobs.pipeline import JobConflictError, JobNotFoundError, JobPipeline
from api.limits import check_chat_limits
from api.metrics import RequestTimer, observe_queue_wait
from api.relay import StreamClosed, Subscription
from common import keys, timing
from common.errors import (
    ContextLengthError,
    InvalidRequestError,
    RateLimitError,
    ServiceError,
    ServiceUnavailableError,
)
from common.jobs import (
    ChoiceDelta,
    ChoiceResult,
    ChunkEvent,
    JobOptions,
    JobRecord,
    JobRequest,
    JobStatus,
    ModelCard,
    OutputSpec,
    SamplingSpec,
    new_job_id,
)
from common.logs import log_event
from common.responses import RESPONSE_PREFIX
from common.schemas import ChatCompletionRequest, CompletionRequest, NamedToolChoice, Usage
from common.settings import Settings

DONE = "[DONE]"
# How long cancelling a running job waits for it to end before answering.
CANCEL_WAIT_SECONDS = 3.0
log = logging.getLogger(__name__)


@dataclass
class JobView:
    """What a reader needs to render a job's events."""

    id: str
    model: str
    created: int
    # How many choices the answer has (n × prompts).
    n: int
    include_usage: bool
    background: bool
    kind: str = "chat"  # or "completion"
    # A new attempt continues the answer (else a stream that showed some of it must end).
    continuable: bool = True
    # The job's attempt when the view was read: a reader starting from the beginning of a
    # job that cannot continue skips the deltas of attempts before it (superseded).
    attempt: int = 0
    # A response (`kind` "response"): its ResponseMeta, as stored in the record.
    response: dict[str, Any] | None = None
    # The record's `created`, to the microsecond (metrics: the queue wait).
    created_at: float = 0.0


def view_of(record: JobRecord, kind: str) -> JobView:
    request = record.request
    return JobView(
        record.id,
        record.model,
        int(record.created),
        request.choices if request else 1,
        record.options.include_usage,
        record.options.background,
        kind=kind,
        continuable=request.continuable if request else True,
        attempt=record.attempt,
        response=record.response,
        created_at=record.created,
    )


def sampling_from_request(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingSpec:
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


T = TypeVar("T")

# A prompt at most this long (characters) is rendered and tokenized on the event loop, in
# well under a millisecond; a longer one in a thread, so that it does not hold up every
# other request. (Every prompt in a thread cost a thread hand-off each: about 4% of the
# API's CPU under load, issue 12.)
INLINE_TOKENIZE_CHARS = 4096


async def tokenize_off_loop_if_long(chars: int, fn: Callable[[], T]) -> T:
    """Run `fn` (tokenizing a prompt of `chars` characters) here if the prompt is short,
    in a thread if not."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return fn()
    return await asyncio.to_thread(fn)


def resolve_max_tokens(
    req: ChatCompletionRequest | CompletionRequest, prompt_tokens: int, max_model_len: int, param: str = "messages"
) -> int:
    room = max_model_len - prompt_tokens
    what = "messages" if param == "messages" else "prompt"
    if room <= 0:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the {what}.",
            param=param,
        )
    wanted = req.requested_max_tokens
    if wanted is None:
        return room
    if wanted > room:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the {what}, {wanted} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param=param,
        )
    return wanted


def check_token_ids(
    req: ChatCompletionRequest | CompletionRequest, vocab_size: int, prompts: list[list[int]] | None = None
) -> None:
    """Token ids a request names (and its token-id `prompts`) must be in the model's
    vocabulary (as vLLM checks them)."""
    named = [
        ("logit_bias", [int(key) for key in req.logit_bias or {}]),
        ("stop_token_ids", req.stop_token_ids or []),
        *(("prompt", p) for p in prompts or []),
    ]
    for param, ids in named:
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"{param}: token id {bad} is out of vocabulary (the model has {vocab_size} tokens)", param=param
            )


def check_tool_support(req: ChatCompletionRequest, card: ModelCard) -> None:
    """What the model's workers can parse (vLLM's renderer checks, with llmq's settings)."""
    choice = req.tool_choice
    if not req.tools or choice is None or choice == "none" or card.tool_call_parser:
        return
    if choice == "auto":
        if not card.auto_tool_choice:
            raise InvalidRequestError(
                '"auto" tool choice requires ENABLE_AUTO_TOOL_CHOICE and TOOL_CALL_PARSER to be set on the '
                f"workers of model '{card.name}' (vLLM's --enable-auto-tool-choice and --tool-call-parser)",
                param="tool_choice",
            )
        return
    desc = f'function "{choice.function.name}"' if isinstance(choice, NamedToolChoice) else f'"{choice}"'
    raise InvalidRequestError(
        f"tool_choice={desc} requires TOOL_CALL_PARSER to be set on the workers of model '{card.name}' "
        "(vLLM's --tool-call-parser)",
        param="tool_choice",
    )


# -- rendering: job events and results as OpenAI's JSON ---------------------------------


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def chunk_json(
    job: JobView,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
    attempt: int = 1,
    seq: int | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": job.id,
        "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage.model_dump() if usage is not None else None,
    }
    if seq is not None:
        body["seq"] = seq  # the job event's sequence number: resume after it
    if attempt > 1:
        body["attempt"] = attempt  # the worker was lost; a new attempt continues the answer
    return _dumps(body)


def delta_choice(job: JobView, c: ChoiceDelta) -> dict[str, Any] | None:
    """A job's choice delta as a streamed choice (None: nothing to send)."""
    if job.kind != "chat":
        # As vLLM's completions stream: a chunk for every step that made tokens, even
        # those whose text the detokenizer holds back ("text": "").
        if not (c.text or c.token_ids or c.finish_reason or c.logprobs):
            return None
        out = {"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
        if c.prompt_token_ids is not None:
            out["prompt_token_ids"] = c.prompt_token_ids  # vLLM sends them with the echo
        return _with_stop_reason(out, c)
    delta: dict[str, Any] = {}
    if c.reasoning:
        delta["reasoning"] = c.reasoning  # vLLM 0.32's name
        delta["reasoning_content"] = c.reasoning  # the name most clients read
    if c.text:
        delta["content"] = c.text
    if c.tool_calls:
        delta["tool_calls"] = c.tool_calls
    if not (delta or c.finish_reason or c.logprobs):
        return None
    return _with_stop_reason(
        {"index": c.index, "delta": delta, "logprobs": c.logprobs, "finish_reason": c.finish_reason}, c
    )


def _with_stop_reason(choice: dict[str, Any], c: ChoiceDelta | ChoiceResult) -> dict[str, Any]:
    """vLLM's extension on a finished choice: the stop string (or token id) that ended it."""
    if c.finish_reason is not None:
        choice["stop_reason"] = c.stop_reason
    return choice


def _message(c: ChoiceResult) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant"}
    if c.message is None:
        out["content"] = c.text
        out["reasoning"] = out["reasoning_content"] = None
        return out
    out["content"] = c.message.get("content")
    reasoning = c.message.get("reasoning")
    out["reasoning"] = out["reasoning_content"] = reasoning
    if c.message.get("tool_calls"):
        out["tool_calls"] = c.message["tool_calls"]
    return out


def result_choices(record: JobRecord, kind: str) -> list[dict[str, Any]]:
    if record.result is None:
        return []
    out = []
    for c in record.result.choices:
        if kind == "chat":
            finish = (c.message or {}).get("finish_reason") or c.finish_reason
            if c.finish_reason in ("cancelled", "error"):
                finish = c.finish_reason
            choice = {"index": c.index, "message": _message(c), "logprobs": c.logprobs, "finish_reason": finish}
        else:
            choice = {"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            if c.prompt_logprobs is not None:
                choice["prompt_logprobs"] = c.prompt_logprobs  # vLLM's extension (echo, prompt_logprobs)
        out.append(_with_stop_reason(choice, c))
    return out


def kind_of(record: JobRecord) -> str:
    if record.id.startswith(RESPONSE_PREFIX):
        return "response"
    output = record.request.output if record.request else None
    if output is not None:
        return output.api
    return "completion" if record.id.startswith("cmpl-") else "chat"


def job_object(record: JobRecord, kind: str | None = None) -> dict[str, Any]:
    """A job as `GET /v1/chat/completions/{id}` (or `/v1/completions/{id}`) shows it."""
    kind = kind or kind_of(record)
    return {
        "id": record.id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(record.created),
        "model": record.model,
        "status": record.status.value,
        "background": record.options.background,
        "attempt": record.attempt,
        "started_at": int(record.started) if record.started else None,
        "finished_at": int(record.finished) if record.finished else None,
        "choices": result_choices(record, kind),
        "usage": record.usage.model_dump() if record.usage else None,
        "error": record.error,
    }


def completion_object(record: JobRecord, kind: str | None = None) -> dict[str, Any]:
    """An ended job as a plain `chat.completion` (or `text_completion`)."""
    kind = kind or kind_of(record)
    usage = record.usage or Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    return {
        "id": record.id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(record.created),
        "model": record.model,
        "choices": result_choices(record, kind),
        "usage": usage.model_dump(),
        "system_fingerprint": None,
    }


class JobAdapter:
    """An OpenAI endpoint on the job pipeline: reading, streaming, cancelling its jobs.
    `kind` names the wire format ("chat" or "completion")."""

    kind = "chat"
    noun = "chat completion"
    path = "/v1/chat/completions"

    def __init__(self, settings: Settings, pipeline: JobPipeline, catalog: ModelCatalog):
        self.settings = settings
        self.pipeline = pipeline
        self.catalog = catalog

    async def _submit(
        self, req: ChatCompletionRequest | CompletionRequest, caller: Principal, log_prompt: dict[str, Any] | None
    ) -> tuple[JobView, Subscription | None, dict[str, str]]:
        """Count, validate, admit, record and queue a request: its view, its channel's
        subscription (unless it runs in the background without a stream) and the
        rate-limit headers its response carries."""
        try:
            submitted = time.time()
            headers = await self.pipeline.admission.count_request(caller)
            await self.pipeline.look(req.model, headers)
            admitted = time.time()
            record = await self.prepare(req, owner=caller.key_id)  # type: ignore[arg-type]
            if timing.ENABLED:
                timing.stamps(record.id, submit=submitted, admitted=admitted, prepared=time.time())
            view = view_of(record, self.kind)
            # Logs (issue 9): the prompt goes in `job.created` only with LOG_PROMPTS=true.
            prompt = log_prompt if self.settings.log_prompts else None
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

    async def prepare(self, req: Any, job_id: str | None = None, owner: str = "") -> JobRecord:
        raise NotImplementedError

    async def model(self, name: str) -> tuple[ModelCard, ChatTokenizer]:
        """A live model's card and tokenizer (404 if none serves it, 503 without Redis)."""
        try:
            return await self.catalog.get(name)
        except RedisError as exc:
            raise ServiceUnavailableError("cannot reach Redis") from exc

    # -- reading ----------------------------------------------------------------------

    def not_found(self, job_id: str) -> JobNotFoundError:
        return JobNotFoundError(f"No {self.noun} job found with id '{job_id}'.", param="completion_id")

    async def view(self, job_id: str, caller: Principal) -> tuple[JobView, JobRecord]:
        """The job, if `caller` may see it (another key's job, or a job of the other
        endpoint, does not exist for it)."""
        record = await self.pipeline.get(job_id)
        if record is None or not caller.owns(record.owner) or kind_of(record) != self.kind:
            raise self.not_found(job_id)
        return view_of(record, self.kind), record

    async def _attempt_at(self, job_id: str, seq: int) -> int | None:
        """The attempt of the job's event `seq` (None: not in its log)."""
        try:
            raw = await self.pipeline.redis.lindex(keys.job_log(job_id), seq)
        except (RedisError, AttributeError):
            return None
        return ChunkEvent.decode(raw).attempt if raw is not None else None

    async def stream(
        self,
        job: JobView,
        subscription: Subscription | None = None,
        after: int = -1,
        cancel_on_disconnect: bool = False,
        shutdown: anyio.Event | None = None,
        timer: RequestTimer | None = None,
        with_ids: bool = False,
    ) -> AsyncIterator[dict[str, str]]:
        """`stream_batches`, one SSE event at a time."""
        batches = self.stream_batches(job, subscription, after, cancel_on_disconnect, shutdown, timer, with_ids)
        try:
            async for batch in batches:
                for item in batch:
                    yield item
        finally:
            with anyio.CancelScope(shield=True):
                await batches.aclose()

    async def stream_batches(
        self,
        job: JobView,
        subscription: Subscription | None = None,
        after: int = -1,
        cancel_on_disconnect: bool = False,
        shutdown: anyio.Event | None = None,
        timer: RequestTimer | None = None,
        with_ids: bool = False,
    ) -> AsyncGenerator[list[dict[str, str]], None]:
        """SSE events ending with `[DONE]`: `data` lines only, as OpenAI and vLLM send
        them, each chunk carrying its job event's `seq` (a resume cursor); with
        `with_ids` (the resume endpoint) each event also has it as its SSE `id`, so
        `Last-Event-ID` resumes exactly after it. Leaving an ordinary stream cancels its
        job; a server shutting down (`shutdown` set) does not: the client resumes on
        another API process. `timer`: the request that created the job (not a resumed
        stream) times what its client sees (api.metrics).

        In batches, each written to the client at once (`api.routes.chat.sse`): the
        events that were ready together (a reader that fell behind), and the last chunks
        with `[DONE]`. The bytes on the wire are the same; there are fewer writes."""

        def event(data: str, seq: int | None = None) -> dict[str, str]:
            return {"data": data, "id": str(seq)} if with_ids and seq is not None else {"data": data}

        finished = False
        out: list[dict[str, str]] = []
        # Content chunks in `out`, counted for the metrics once they are sent.
        content = 0
        # The record's `started`, as the worker's last event carries it (metrics).
        started: float | None = None
        try:
            if after < 0 and job.kind == "chat":
                role = {"role": "assistant", "content": ""}
                first = [{"index": i, "delta": role, "logprobs": None, "finish_reason": None} for i in range(job.n)]
                yield [event(chunk_json(job, first))]
            # The attempt whose output the client has (a resumed client: that of its cursor).
            sent_in: int | None = None
            if after >= 0 and not job.continuable:
                sent_in = await self._attempt_at(job.id, after)
            try:
                async for batch in self.pipeline.follow_batches(job.id, after, subscription):
                    for ev in batch:
                        if ev.kind == "delta":
                            if not job.continuable and sent_in is None and ev.attempt < job.attempt:
                                continue  # a superseded attempt's output: the reader has none of it
                            if not job.continuable and sent_in is not None and ev.attempt != sent_in:
                                raise StreamClosed(
                                    "the worker running this job was lost and the job started over; its stream "
                                    "cannot continue without repeating or mixing output (several choices, or tool "
                                    "calls, structured output, reasoning or logprobs). Fetch the result: "
                                    f"GET {self.path}/{job.id}",
                                    code="worker_lost",
                                )
                            choices = [d for d in (delta_choice(job, c) for c in ev.choices) if d is not None]
                            if choices:
                                sent_in = ev.attempt
                                out.append(event(chunk_json(job, choices, attempt=ev.attempt, seq=ev.seq), ev.seq))
                                content += any(c.text or c.tool_calls or c.reasoning for c in ev.choices)
                        elif ev.kind == "done":
                            finished = True
                            started = ev.started
                            # Ends that came with no delta (cancelled while queued, or by the reaper).
                            tail: list[dict[str, Any]] = [
                                d
                                for c in ev.choices
                                if c.finish_reason
                                and (d := delta_choice(job, ChoiceDelta(index=c.index, finish_reason=c.finish_reason)))
                            ]
                            usage = job.include_usage and ev.usage is not None
                            if tail:
                                # Each seq once on the wire: the usage chunk, if one follows, has it.
                                seq = None if usage else ev.seq
                                out.append(event(chunk_json(job, tail, attempt=ev.attempt, seq=seq), seq))
                            if usage:
                                out.append(event(chunk_json(job, [], ev.usage, attempt=ev.attempt, seq=ev.seq), ev.seq))
                        else:
                            finished = True
                            started = ev.started
                            # The job's own error carries its seq (a stream that broke has none).
                            error = ServiceError.from_dict(ev.error or {}).to_dict() | {"seq": ev.seq}
                            out.append(event(json.dumps(error), ev.seq))
                    # (The end goes out with [DONE], in one write: the reader stops after it.)
                    if out and not finished:
                        sending, out = out, []
                        yield sending
                        if timer is not None and content:
                            timer.content_sent(content)  # metrics: sent (the next one is asked for)
                        content = 0
                        if timing.ENABLED:
                            timing.stamp(job.id, "sse")
            except ServiceError as exc:
                finished = True
                out.append({"data": json.dumps(exc.to_dict())})
            except RedisError:
                finished = True
                out.append(
                    {"data": json.dumps(ServiceUnavailableError("lost the connection to Redis mid-stream").to_dict())}
                )
            finished = True
            out.append({"data": DONE})
            sending, out = out, []
            yield sending
            if timing.ENABLED:
                timing.stamp(job.id, "sse")  # (unless noted already: the whole answer came with its end)
            if timer is not None:
                if content:  # the last content chunks went out with [DONE]
                    timer.content_sent(content)
                timer.ended()  # metrics: [DONE] sent
        finally:
            leaving = not finished and cancel_on_disconnect and not (shutdown is not None and shutdown.is_set())
            if leaving:
                with anyio.CancelScope(shield=True):
                    await self.pipeline.cancel(job.id, quiet=True, source="disconnect")
            if timer is not None:
                if started is not None:
                    observe_queue_wait(job.model, job.created_at, started)
                else:  # ended by the API or the reaper, or not ended: from the record
                    with anyio.CancelScope(shield=True):
                        await self.observe_queue_wait(job)
            if timing.ENABLED:
                timing.flush(self.pipeline.redis, job.id)

    async def collect(self, job: JobView, subscription: Subscription | None, caller: Principal) -> dict[str, Any]:
        """Wait for the job to end; the `chat.completion` (`text_completion`). If the
        caller goes away first (the task is cancelled), the job is cancelled."""
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
        return await self.final_object(record)

    async def final_object(self, record: JobRecord) -> dict[str, Any]:
        """An ended job as a non-streamed request answers it."""
        return completion_object(record, self.kind)

    async def observe_queue_wait(self, job: JobView) -> None:
        """Metrics: the job's queue wait (created -> started) from its record, once the
        request following it is done with it (nothing if it never started)."""
        try:
            created, started = await self.pipeline.redis.hmget(keys.job(job.id), ["created", "started"])
        except RedisError:
            return
        observe_queue_wait(job.model, created, started)

    async def get(self, job_id: str, caller: Principal) -> dict[str, Any]:
        _, record = await self.view(job_id, caller)
        return job_object(record, self.kind)

    # -- cancelling -------------------------------------------------------------------

    async def cancel(self, job_id: str, caller: Principal) -> dict[str, Any]:
        """Cancel a job and answer with it (a running one ends within an engine step or two)."""
        await self.view(job_id, caller)
        before = await self.pipeline.cancel(job_id, source="client")
        if before == "missing":
            raise self.not_found(job_id)
        if before in (JobStatus.completed.value, JobStatus.failed.value):
            raise JobConflictError(f"Job '{job_id}' has already ended ({before}); it cannot be cancelled.")
        return job_object(await self.wait_ended(job_id, caller), self.kind)

    async def wait_ended(self, job_id: str, caller: Principal) -> JobRecord:
        """The job's record once it has ended, or after CANCEL_WAIT_SECONDS (a cancelled
        running job ends within an engine step or two)."""
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        _, record = await self.view(job_id, caller)
        while not record.status.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            _, record = await self.view(job_id, caller)
        return record


class ChatAdapter(JobAdapter):
    """`/v1/chat/completions`: a chat request becomes a job record (template, prompt
    tokens, sampling, the worker's OutputSpec, limits: every client error is raised
    before anything is queued)."""

    kind = "chat"
    noun = "chat completion"
    path = "/v1/chat/completions"

    async def prepare(self, req: ChatCompletionRequest, job_id: str | None = None, owner: str = "") -> JobRecord:
        """Validate a request and turn it into a job record (not yet stored). Every client
        error is raised here."""
        if req.n > self.settings.max_n:
            raise InvalidRequestError(f"n must be at most {self.settings.max_n}", param="n")
        # Messages, their text and n × max_tokens, before anything is tokenized.
        choice_max_tokens = check_chat_limits(req, self.settings)
        card, tokenizer = await self.model(req.model)
        check_tool_support(req, card)
        check_token_ids(req, tokenizer.vocab_size)
        chars = sum(m.text_chars() for m in req.messages) + (INLINE_TOKENIZE_CHARS if req.tools else 0)
        prompt_ids = await tokenize_off_loop_if_long(chars, lambda: tokenizer.encode_chat(req))
        max_tokens = min(resolve_max_tokens(req, len(prompt_ids), card.max_model_len), choice_max_tokens)
        sampling = sampling_from_request(req, max_tokens)
        # Tools, structured output, logprobs, reasoning (...): the worker answers through
        # vLLM's own protocol and parsers, from the request as validated.
        output = (
            OutputSpec(api="chat", body=req.vllm_body(max_tokens)) if req.needs_output(card.reasoning_parser) else None
        )
        return JobRecord(
            id=job_id or new_job_id(),
            model=req.model,
            owner=owner,
            request=JobRequest(prompt_token_ids=prompt_ids, sampling=sampling, output=output),
            options=JobOptions(stream=req.stream, include_usage=req.include_usage, background=req.background),
        )

    async def submit(
        self, req: ChatCompletionRequest, caller: Principal
    ) -> tuple[JobView, Subscription | None, dict[str, str]]:
        return await self._submit(req, caller, {"messages": [m.for_template() for m in req.messages]})
