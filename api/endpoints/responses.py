"""ResponsesAdapter: OpenAI's Responses API (`/v1/responses`) on the job pipeline.

A response is a chat job (`resp_...`): its request becomes chat messages (instructions,
the conversation of `previous_response_id`, its input items) and a chat request, which
the chat endpoint validates, tokenizes and queues as it would its own; what the
Responses API adds is kept in the record (`JobRecord.response`). Every reader of a
response, live or resumed (`starting_after`), on any API process, gets the events
`common.responses.ResponseTranslator` makes of the job's replay log: the same events,
with the same sequence numbers, whoever reads them and whenever.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from pydantic import ValidationError
from redis.exceptions import RedisError

from api.auth import Principal
from api.endpoints.chat import ChatAdapter, JobView, _dumps, view_of
from api.jobs.pipeline import JobNotFoundError
from api.metrics import RequestTimer
from api.relay import Subscription
from common import keys
from common.errors import InvalidRequestError, ServiceError, ServiceUnavailableError
from common.jobs import ChoiceResult, JobOptions, JobRecord
from common.responses import (
    CHAT_PARAM_NAMES,
    FINAL_STATUS,
    RESPONSE_PREFIX,
    ResponseMeta,
    ResponseReader,
    ResponsesRequest,
    ResponseTranslator,
    chat_body,
    meta_of,
    new_response_id,
    response_error,
    response_object,
    usage_object,
)
from common.schemas import ChatCompletionRequest


def _chat_param(param: str | None) -> str | None:
    """A chat-side parameter as the Responses API names it (`tools.0.function.name`:
    `tools.0.name`; `response_format.json_schema.schema`: `text.format.schema`)."""
    if not param:
        return param
    parts = param.split(".")
    if parts[0] == "tools" and len(parts) > 2 and parts[2] == "function":
        return ".".join(parts[:2] + parts[3:])
    if parts[0] == "response_format":
        return ".".join(["text", "format", *(p for p in parts[1:] if p != "json_schema")])
    if parts[0] in CHAT_PARAM_NAMES:
        if parts[0] == "messages":
            return "input"  # message indexes do not map onto input items
        return ".".join([CHAT_PARAM_NAMES[parts[0]], *parts[1:]])
    return param


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    """A chat-side 400 as the Responses API names it: its param, and the message's
    leading `param:` (chat's messages name the field first)."""
    old, new = exc.param, _chat_param(exc.param)
    if old and new != old:
        exc.param = new
        head, sep, rest = exc.message.partition(":")
        if sep and head.strip() in (old, old.split(".")[0]):
            exc.message = f"{new}:{rest}"
    elif not old:
        for name, value in (("messages", "input"), ("max_tokens", "max_output_tokens")):
            if exc.message.startswith(name + ":"):
                exc.message = value + exc.message[len(name) :]
    exc.args = (exc.message,)
    return exc


def _as_response_error(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if isinstance(p, str | int)]
    extra = (first.get("ctx") or {}).get("param")
    if isinstance(extra, str) and extra:
        loc.append(extra)
    param = _chat_param(".".join(loc) or None)
    return InvalidRequestError(f"{param}: {first['msg']}" if param else str(first["msg"]), param=param)


# Keep an ended response's object in its record, unless the response was deleted
# meanwhile (a deleted one's record must not come back, nor lose its TTL).
_KEEP_FINAL = """
if redis.call('HEXISTS', KEYS[1], 'response') == 1 then
  redis.call('HSET', KEYS[1], 'response_final', ARGV[1])
end
return 1
"""


class ResponsesAdapter(ChatAdapter):
    kind = "response"
    noun = "response"
    path = "/v1/responses"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._keep = self.pipeline.redis.register_script(_KEEP_FINAL)

    # -- creating ---------------------------------------------------------------------

    async def prepare(  # type: ignore[override]
        self, req: ResponsesRequest, job_id: str | None = None, owner: str = ""
    ) -> JobRecord:
        self._limits(req)
        job_id = job_id or new_response_id()
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            history = await self.history_of(req.previous_response_id, Principal(key_id=owner))
        meta = meta_of(req, job_id.removeprefix(RESPONSE_PREFIX), history)
        try:
            chat = ChatCompletionRequest.model_validate(chat_body(req, meta))
        except ValidationError as exc:
            raise _as_response_error(exc) from exc
        try:
            record = await super().prepare(chat, job_id=job_id, owner=owner)
        except InvalidRequestError as exc:
            _renamed(exc)
            raise
        record.response = meta.model_dump(mode="json")
        record.options = JobOptions(stream=req.stream, include_usage=True, background=req.background)
        return record

    def _limits(self, req: ResponsesRequest) -> None:
        """Input items and their text, before anything is built from them: every item
        is stored with the response (the chat limits apply to the messages made of
        them, which are fewer: reasoning items make none, function calls merge)."""
        settings = self.settings
        items = [req.input] if isinstance(req.input, str) else req.input
        most = max(1, settings.max_messages - 1)
        if len(items) > most:
            raise InvalidRequestError(
                f"input: at most {most} input items are allowed, got {len(items)}",
                param="input",
                code="array_above_max_length",
            )
        chars = len(req.input) if isinstance(req.input, str) else len(json.dumps(req.input, ensure_ascii=False))
        chars += len(req.instructions or "")
        if chars > settings.max_prompt_chars:
            raise InvalidRequestError(
                f"input: the input holds {chars} characters; at most {settings.max_prompt_chars} are allowed",
                param="input",
                code="string_above_max_length",
            )

    async def submit(  # type: ignore[override]
        self, req: ResponsesRequest, caller: Principal
    ) -> tuple[JobView, Subscription | None, dict[str, str]]:
        return await self._submit(req, caller, {"input": req.input, "instructions": req.instructions})  # type: ignore[arg-type]

    async def history_of(self, response_id: str, caller: Principal) -> list[dict[str, Any]]:
        """The conversation a response continuing `response_id` starts from."""
        record = await self.pipeline.get(response_id)
        if record is None or not self._visible(record, caller):
            raise JobNotFoundError(
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if not record.status.terminal:
            raise InvalidRequestError(
                f"Previous response '{response_id}' is still {record.status.value}; continue from it once it "
                "has ended.",
                param="previous_response_id",
            )
        meta = ResponseMeta.model_validate(record.response)
        output = (await self.object_of(record))["output"]
        return meta.next_history(output)

    # -- reading ----------------------------------------------------------------------

    def not_found(self, job_id: str) -> JobNotFoundError:
        return JobNotFoundError(f"Response with id '{job_id}' not found.", param="response_id")

    @staticmethod
    def _visible(record: JobRecord, caller: Principal, stored: bool = True) -> bool:
        """A response of the caller's (deleted ones and other keys' do not exist for
        it; with `stored`, nor do those created with `store: false`)."""
        return (
            record.id.startswith(RESPONSE_PREFIX)
            and record.response is not None
            and (not stored or bool(record.response.get("store", True)))
            and caller.owns(record.owner)
        )

    async def view(self, job_id: str, caller: Principal, stored: bool = False) -> tuple[JobView, JobRecord]:
        """The response, if `caller` may see it (with `stored`: only if it was stored,
        as every route but its own creation requires)."""
        record = await self.pipeline.get(job_id)
        if record is None or not self._visible(record, caller, stored):
            raise self.not_found(job_id)
        return view_of(record, self.kind), record

    def translator(self, job: JobView | JobRecord) -> ResponseTranslator:
        if isinstance(job, JobRecord):
            request = job.request
            return ResponseTranslator(
                job.id,
                job.model,
                job.created,
                ResponseMeta.model_validate(job.response or {}),
                continuable=request.continuable if request else True,
            )
        return ResponseTranslator(
            job.id,
            job.model,
            job.created,
            ResponseMeta.model_validate(job.response or {}),
            continuable=job.continuable,
        )

    async def object_of(self, record: JobRecord) -> dict[str, Any]:
        """The response object: its output as its stream shows it (the job's log through
        the translator), its status from the log's end or, before it, the record. Once
        it has ended, the object is kept in the record, and read from there."""
        if record.status.terminal and record.response_final is not None:
            return record.response_final
        translator = self.translator(record)
        translator.start()
        try:
            log = await self.pipeline.store.log(record.id)
        except RedisError as exc:
            raise ServiceUnavailableError("cannot reach Redis") from exc
        for ev in log:
            translator.feed(ev.kind, ev.attempt, ev.choices, ev.usage, ev.error)
            if translator.ended:
                break
        if not translator.ended:
            translator.status = "queued" if record.status.value == "queued" else "in_progress"
            if record.status.terminal:
                # Ended with no end event in its log (should not happen): the record says how.
                translator.status = {"completed": "completed", "failed": "failed"}.get(record.status.value, "cancelled")
                translator.error = response_error(record.error) if record.status.value == "failed" else None
        final = translator.snapshot(completed_at=record.finished)
        if record.status.terminal and translator.ended:
            try:
                await self._keep(keys=[keys.job(record.id)], args=[_dumps(final)])
            except RedisError:
                pass  # kept next time
        return final

    async def get(self, job_id: str, caller: Principal) -> dict[str, Any]:
        _, record = await self.view(job_id, caller, stored=True)
        return await self.object_of(record)

    async def final_object(self, record: JobRecord) -> dict[str, Any]:
        return await self.object_of(record)

    async def input_items(
        self,
        job_id: str,
        caller: Principal,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
        before: str | None = None,
    ) -> dict[str, Any]:
        """`GET /v1/responses/{id}/input_items`: this response's own input items, a page."""
        _, record = await self.view(job_id, caller, stored=True)
        items = list(ResponseMeta.model_validate(record.response).input)
        if order == "desc":
            items.reverse()
        ids = [item["id"] for item in items]
        start, end = 0, len(items)
        if after is not None:
            if after not in ids:
                raise InvalidRequestError(f"No input item with id '{after}' in this response.", param="after")
            start = ids.index(after) + 1
        if before is not None:
            if before not in ids:
                raise InvalidRequestError(f"No input item with id '{before}' in this response.", param="before")
            end = ids.index(before)
        page = items[start:end][:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + len(page) < end,
        }

    # -- streaming --------------------------------------------------------------------

    async def stream_batches(  # type: ignore[override]
        self,
        job: JobView,
        subscription: Subscription | None = None,
        after: int = -1,
        cancel_on_disconnect: bool = False,
        shutdown: anyio.Event | None = None,
        timer: RequestTimer | None = None,
        with_ids: bool = False,
    ) -> AsyncGenerator[list[dict[str, str]], None]:
        """The response's own events (`stream`: `event:` / `data:` pairs), one a batch, for
        the create route, which writes a chat job's batches (the chat chunks of the job
        underneath must never reach a Responses client)."""
        events = self.stream(job, subscription, after, cancel_on_disconnect, shutdown, timer, with_ids)
        try:
            async for item in events:
                yield [item]
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()  # type: ignore[attr-defined]

    async def stream(  # type: ignore[override]
        self,
        job: JobView,
        subscription: Subscription | None = None,
        after: int = -1,
        cancel_on_disconnect: bool = False,
        shutdown: anyio.Event | None = None,
        timer: RequestTimer | None = None,
        with_ids: bool = False,
    ) -> AsyncIterator[dict[str, str]]:
        """The response's events after sequence number `after` (-1: all), as `event:` /
        `data:` pairs, live until its last (`response.completed`, `.incomplete`,
        `.failed`, `.cancelled`, or an `error`). The whole log is translated every time
        (the numbers are the translator's, not the log's) and what the reader has is
        skipped. Leaving an ordinary stream cancels its response; a server shutting down
        does not."""
        translator = self.translator(job)
        reader = ResponseReader(translator, after, job.attempt)
        finished = False

        def sse(event: dict[str, Any]) -> dict[str, str]:
            return {"event": event["type"], "data": _dumps(event)}

        try:
            for event in reader.start():
                yield sse(event)
            try:
                async for ev in self.pipeline.follow(job.id, -1, subscription):
                    events = reader.feed(ev.kind, ev.attempt, ev.choices, ev.usage, ev.error)
                    for event in events:
                        if event["type"] == "response.completed":
                            # The stored response, as GET shows it: completed_at is the
                            # record's (written with this last event, in one step).
                            await self._stamp_completed(event, job.id)
                        yield sse(event)
                    if events and timer is not None and ev.kind == "delta":
                        timer.content_sent()  # metrics: sent (the next one is asked for)
                    if reader.ended:
                        break
            except ServiceError as exc:
                body = exc.to_dict()["error"]
                yield sse(
                    {
                        "type": "error",
                        "sequence_number": translator.seq + 1,
                        "code": body.get("code"),
                        "message": body.get("message"),
                        "param": body.get("param"),
                    }
                )
            except RedisError:
                yield sse(
                    {
                        "type": "error",
                        "sequence_number": translator.seq + 1,
                        "code": "service_unavailable",
                        "message": "lost the connection to Redis mid-stream",
                        "param": None,
                    }
                )
            finished = True
            if timer is not None:
                timer.ended()
        finally:
            leaving = not finished and cancel_on_disconnect and not (shutdown is not None and shutdown.is_set())
            if leaving:
                with anyio.CancelScope(shield=True):
                    await self.pipeline.cancel(job.id, quiet=True, source="disconnect")
            if timer is not None:
                with anyio.CancelScope(shield=True):
                    await self.observe_queue_wait(job)

    async def _stamp_completed(self, event: dict[str, Any], job_id: str) -> None:
        """A `response.completed` event's response gets its `completed_at` from the
        record, as `object_of` gives it (the same on every replay)."""
        try:
            finished = await self.pipeline.redis.hget(keys.job(job_id), "finished")
        except RedisError:
            return
        if finished is not None:
            event["response"]["completed_at"] = int(float(finished))

    # -- cancelling and deleting -------------------------------------------------------

    async def _end(self, job_id: str, caller: Principal) -> JobRecord:
        """Cancel the response if it has not ended; the record once it has (or after
        CANCEL_WAIT_SECONDS)."""
        _, record = await self.view(job_id, caller, stored=True)
        if not record.status.terminal:
            await self.pipeline.cancel(job_id, source="client")
            record = await self.wait_ended(job_id, caller)
        return record

    async def cancel(self, job_id: str, caller: Principal) -> dict[str, Any]:
        """Idempotent: an ended response comes back as it is."""
        return await self.object_of(await self._end(job_id, caller))

    async def delete(self, job_id: str, caller: Principal) -> dict[str, Any]:
        """Forget a response (cancelled first if it runs): it is a 404 from now on, for
        reads, streams and `previous_response_id`. An ended one's record and log go at
        once; a running one's (still being written) expire with their TTL."""
        record = await self._end(job_id, caller)
        try:
            await self.pipeline.redis.hdel(keys.job(job_id), "response", "response_final")
            # A batch line's record stays (without its response) until its TTL, so the
            # batch's output says it was deleted rather than that it never ran.
            if record.status.terminal and record.batch is None:
                await self.pipeline.redis.delete(keys.job(job_id), keys.job_log(job_id))
        except RedisError as exc:
            raise ServiceUnavailableError("cannot reach Redis") from exc
        return {"id": job_id, "object": "response", "deleted": True}


def output_from_result(choice: ChoiceResult | None, base: str) -> list[dict[str, Any]]:
    """A response's output items from its job's result (batch output, where no stream
    was followed): reasoning, message, function calls, ids as the translator makes them."""
    if choice is None:
        return []
    message = choice.message or {"content": choice.text}
    items: list[dict[str, Any]] = []
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if reasoning:
        index = len(items)
        items.append(
            {
                "id": f"rs_{base}_{index}",
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": reasoning}],
                "status": "completed",
            }
        )
    calls = message.get("tool_calls") or []
    if message.get("content"):
        index = len(items)
        items.append(
            {
                "id": f"msg_{base}_{index}",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": message["content"], "annotations": [], "logprobs": []}],
            }
        )
    for k, call in enumerate(calls):
        index = len(items)
        fn = call.get("function") or {}
        items.append(
            {
                "id": f"fc_{base}_{index}",
                "type": "function_call",
                "status": "completed",
                "call_id": call.get("id") or f"call_{base}_{k}",
                "name": fn.get("name") or "",
                "arguments": fn.get("arguments") or "",
            }
        )
    if items and choice.finish_reason == "length":
        items[-1]["status"] = "incomplete"  # cut short, as the stream's last item
    return items


def result_object(record: JobRecord) -> dict[str, Any]:
    """An ended response's object (a batch's output): as GET showed it if it did, else
    from its job's result alone."""
    if record.response_final is not None:
        return record.response_final
    meta = ResponseMeta.model_validate(record.response or {})
    choice = record.result.choices[0] if record.result and record.result.choices else None
    finish = choice.finish_reason if choice is not None else None
    status, incomplete = FINAL_STATUS.get(finish or "stop", ("completed", None))
    if record.status.value in ("failed", "cancelled"):
        status, incomplete = record.status.value, None
    return response_object(
        record.id,
        record.model,
        record.created,
        meta,
        status,
        output_from_result(choice, record.id.removeprefix(RESPONSE_PREFIX)),
        usage_object(record.usage),
        response_error(record.error) if status == "failed" else None,
        incomplete,
        record.finished,
    )
