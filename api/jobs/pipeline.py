"""JobPipeline: what every endpoint does with a job, whatever its wire format.

submit: admit the job (the model's queue and the caller's limits, see `api.admission`),
        store the record (queued, with its deadline) and send its message, listening on
        its channel first when the caller will follow it (no first events missed);
cancel: end a queued job now, or have its worker abort a running one;
get:    the record; follow: its events from any cursor (`JobReader`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.admission import Admission
from api.jobs.reader import JobReader
from api.metrics import count_cancellation
from api.relay import StreamRelay, Subscription
from common import keys, timing
from common.errors import ConflictError, NotFoundError, RateLimitError, ServiceUnavailableError
from common.job_queue import JobQueue
from common.jobs import ChunkEvent, JobRecord, JobStatus
from common.jobstore import JobStore
from common.logs import job_fields, log_event
from common.metrics import JOBS_ENDED
from common.settings import Settings

log = logging.getLogger(__name__)


class JobNotFoundError(NotFoundError):
    default_code = "job_not_found"


class JobConflictError(ConflictError):
    default_code = "job_not_cancellable"


class MessageGroups:
    """Sends the Celery messages of jobs queued at about the same time together: while
    one group is being sent, the jobs queued meanwhile gather into the next (per model
    and priority), which goes out in one call (`JobQueue.submit_many`: one pipelined
    round trip for the group, against one per job). A job queued alone goes out alone,
    at once. Should a group fail,
    each of its jobs is sent again on its own (with the queue's retries); a message
    sent twice is harmless (a job is claimed once; the sweeper sends duplicates too)."""

    def __init__(self, queue: JobQueue):
        self.queue = queue
        self._waiting: dict[tuple[str, int], list[tuple[str, asyncio.Future[None]]]] = {}
        self._sender: asyncio.Task[None] | None = None

    async def send(self, job_id: str, model: str, priority: int) -> None:
        """Send the job's message; returns once it went out (raises if it could not)."""
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller that has gone (cancelled) leaves its outcome unread: not an error.
        sent.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.setdefault((model, priority), []).append((job_id, sent))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting(), name="job-messages")
        await asyncio.shield(sent)

    async def _send_waiting(self) -> None:
        groups: dict[tuple[str, int], list[tuple[str, asyncio.Future[None]]]] = {}
        try:
            while self._waiting:
                groups, self._waiting = self._waiting, {}
                await asyncio.gather(*(self._send_group(m, p, items) for (m, p), items in groups.items()))
        finally:
            self._sender = None
            # Stopped midway (the process is shutting down): no caller is left waiting.
            for items in [*groups.values(), *self._waiting.values()]:
                for _, sent in items:
                    if not sent.done():
                        sent.set_exception(ServiceUnavailableError("the job's message was not sent"))
            self._waiting = {}

    async def _send_group(self, model: str, priority: int, items: list[tuple[str, asyncio.Future[None]]]) -> None:
        if len(items) > 1:
            try:
                await self.queue.submit_many([job_id for job_id, _ in items], model, priority)
            except Exception:
                log.warning("sending a group of %d job messages failed; sending each on its own", len(items))
            else:
                for _, sent in items:
                    if not sent.done():
                        sent.set_result(None)
                return
        await asyncio.gather(*(self._send_one(job_id, model, priority, sent) for job_id, sent in items))

    async def _send_one(self, job_id: str, model: str, priority: int, sent: asyncio.Future[None]) -> None:
        try:
            await self.queue.submit(job_id, model, priority)
        except Exception as exc:
            if not sent.done():
                sent.set_exception(exc)
        else:
            if not sent.done():
                sent.set_result(None)


class JobPipeline:
    def __init__(
        self, settings: Settings, redis: aioredis.Redis, relay: StreamRelay, queue: JobQueue, admission: Admission
    ):
        self.settings = settings
        self.admission = admission
        self.redis = redis
        self.store = JobStore(redis, settings.job_ttl_seconds, settings.queue_resend_seconds)
        self.relay = relay
        self.queue = queue
        self.messages = MessageGroups(queue)
        self.reader = JobReader(redis, self.store, relay)
        # `look`'s last count of each model's waiting jobs (a look's, or a submit's: the
        # admission script answers it), and the limit then: (count, limit).
        self._looked: dict[str, tuple[int, int]] = {}

    async def submit(
        self,
        record: JobRecord,
        *,
        follow: bool,
        priority: int = keys.CHAT_PRIORITY,
        headers: dict[str, str] | None = None,
        log_fields: dict[str, Any] | None = None,
    ) -> Subscription | None:
        """Admit, record and queue a client's job. With `follow`, its channel is
        subscribed before the job is queued; the subscription is returned. A job refused
        by admission control raises a `RateLimitError` (carrying `headers` and
        Retry-After) with nothing written. A job that could not be queued is refused to
        the client, and ended so that it never runs. `log_fields`: more for its
        `job.created` log line."""
        max_waiting = await self.admission.queue_limit(record.model)
        max_active = self.settings.max_concurrent_jobs_per_key
        # The channel is subscribed while the record is written (two round trips at once,
        # not one after the other): `enqueue` waits for the subscription before it sends
        # the job's message, so no worker can publish an event before it (a third of a
        # millisecond of every first token at one stream, and more in a burst).
        subscribing = (
            asyncio.create_task(self.relay.subscribe(keys.job_channel(record.id)), name="subscribe") if follow else None
        )
        try:
            code, count = await self.enqueue(
                record, priority, limits=(max_waiting, max_active), log_fields=log_fields, before_send=subscribing
            )
            if code in (1, -1) and max_waiting:
                self._looked[record.model] = (count, max_waiting)
            if code < 0:
                limit = max_waiting if code == -1 else max_active
                raise await self.admission.refusal(record.model, code, count, limit, headers or {})
            subscription = await subscribing if subscribing is not None else None
        except RateLimitError:
            with anyio.CancelScope(shield=True):
                await self._drop_subscription(subscribing)
            raise
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._drop_subscription(subscribing)
                await self.cancel(record.id, quiet=True)
            if isinstance(exc, RedisError):
                raise ServiceUnavailableError("cannot reach Redis") from exc
            raise
        return subscription

    async def _drop_subscription(self, subscribing: asyncio.Task[Subscription] | None) -> None:
        """Undo the subscription made (or being made: it is waited for, not cancelled,
        so that the relay is left as it was) for a job that is not going ahead."""
        if subscribing is None:
            return
        try:
            subscription = await subscribing
        except Exception:  # it failed: nothing to undo
            return
        await self.relay.unsubscribe(subscription)

    async def look(self, model: str, headers: dict[str, str] | None = None) -> None:
        """A cheap look at the model's queue before a request is even validated, so that
        a burst past the limit is refused at the cost of one Redis command (`submit`'s
        script decides, atomically). The count kept is the last look's or the last
        submit's (the script answers it): far from the limit (under half), it is used as
        it is, with no round trip (one a request cost about 4% of the API's CPU under
        load, and a third of a millisecond of every first token at one stream); near or
        at the limit, it is read again every time."""
        last = self._looked.get(model)
        if last is not None and last[0] < last[1] // 2:
            return
        max_waiting = await self.admission.queue_limit(model)
        waiting = await self.redis.zcard(keys.waiting(model))
        self._looked[model] = (waiting, max_waiting)
        if waiting >= max_waiting:
            raise await self.admission.refusal(model, -1, waiting, max_waiting, headers or {})

    async def enqueue(
        self,
        record: JobRecord,
        priority: int,
        ttl: int | None = None,
        limits: tuple[int, int] = (0, 0),
        log_fields: dict[str, Any] | None = None,
        before_send: Awaitable[Any] | None = None,
    ) -> tuple[int, int]:
        """Store a job (unless its id exists: a batch line handed out again, or it is
        refused by `limits`: the most jobs waiting for its model, and queued or running
        for its owner) and send its message, once `before_send` (the subscription to
        its channel) is done. Answers what `JobStore.create` does. Should sending fail
        after the record was written, the sweeper sends it later."""
        if record.deadline is None:
            record.deadline = record.created + self.settings.queue_timeout_seconds
        code, count = await self.store.create(record, ttl, *limits)
        if code == 1:
            # Logs (issue 9): the job's first line, written before its message is sent, so
            # before any worker's `job.started`.
            sampling = record.request.sampling if record.request else None
            log_event(
                log,
                "job.created",
                **job_fields(record),
                n=sampling.n if sampling else None,
                max_tokens=sampling.max_tokens if sampling else None,
                prompt_tokens=len(record.request.prompt_token_ids) if record.request else None,
                stream=record.options.stream,
                background=record.options.background,
                **(log_fields or {}),
            )
        if code == 1 or (code == 0 and await self.store.status(record.id) == JobStatus.queued):
            if timing.ENABLED and record.options.stream:
                timing.stamp(record.id, "recorded")
            if before_send is not None:
                await before_send
                if timing.ENABLED and record.options.stream:
                    timing.stamp(record.id, "subscribed")
            await self.messages.send(record.id, record.model, priority)
            if timing.ENABLED and record.options.stream:
                timing.stamp(record.id, "queued")
        return code, count

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.store.get(job_id)

    def follow(
        self, job_id: str, after: int = -1, subscription: Subscription | None = None
    ) -> AsyncIterator[ChunkEvent]:
        return self.reader.follow(job_id, after, subscription)

    def follow_batches(
        self, job_id: str, after: int = -1, subscription: Subscription | None = None
    ) -> AsyncIterator[list[ChunkEvent]]:
        return self.reader.follow_batches(job_id, after, subscription)

    async def cancel(self, job_id: str, quiet: bool = False, source: str | None = None) -> str:
        """Cancel a job: the status it had. A queued job ends now; a running one is
        aborted by its worker (announced at once, and flagged in the record in case the
        announcement is missed). `quiet`: for clean-up, never raises. `source` (client,
        disconnect, batch): who asked, counted in the metrics (None: not counted)."""
        try:
            record = await self.store.get(job_id)
            before = "missing" if record is None else await self.store.cancel(record)
            if before == "in_progress":
                await self.redis.publish(keys.CANCEL_CHANNEL, job_id)
            # Metrics (issue 9): a queued job ended here is this process's terminal write; a
            # cancellation counts once (a running job already flagged is not counted again).
            if record is not None:
                if before == "queued":
                    JOBS_ENDED.labels(record.model, JobStatus.cancelled.value, "").inc()
                if source and (before == "queued" or (before == "in_progress" and not record.cancel_requested)):
                    count_cancellation(record.model, source)
            if record is not None and before in ("queued", "in_progress"):
                # Logs (issue 9). Asked again for a job already flagged (a batch's cancel
                # repeats): DEBUG. A queued job ended here: this is its end.
                log_event(
                    log,
                    "job.cancel_requested",
                    level=logging.DEBUG if record.cancel_requested else logging.INFO,
                    **job_fields(record),
                    status=before,
                    by=source,
                )
                if before == "queued":
                    log_event(
                        log,
                        "job.ended",
                        **job_fields(record),
                        status=JobStatus.cancelled,
                        attempt=record.attempt,
                        prompt_tokens=len(record.request.prompt_token_ids) if record.request else None,
                        total_s=time.time() - record.created,
                        by="api",
                    )
        except RedisError:
            if quiet:
                log_event(log, "job.cancel_failed", level=logging.WARNING, job_id=job_id, error="redis unreachable")
                return "unknown"
            raise
        return before
