"""JobPipeline: what every endpoint does with a job, whatever its wire format.

submit: store the record (queued, with its deadline) and send its message, listening on
        its channel first when the caller will follow it (no first events missed);
cancel: end a queued job now, or have its worker abort a running one;
get:    the record; follow: its events from any cursor (`JobReader`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.jobs.reader import JobReader
from api.relay import StreamRelay, Subscription
from common import keys
from common.errors import ConflictError, NotFoundError, ServiceUnavailableError
from common.job_queue import JobQueue
from common.jobs import ChunkEvent, JobRecord, JobStatus
from common.jobstore import JobStore
from common.settings import Settings

log = logging.getLogger(__name__)


class JobNotFoundError(NotFoundError):
    default_code = "job_not_found"


class JobConflictError(ConflictError):
    default_code = "job_not_cancellable"


class JobPipeline:
    def __init__(self, settings: Settings, redis: aioredis.Redis, relay: StreamRelay, queue: JobQueue):
        self.settings = settings
        self.redis = redis
        self.store = JobStore(redis, settings.job_ttl_seconds, settings.queue_resend_seconds)
        self.relay = relay
        self.queue = queue
        self.reader = JobReader(redis, self.store, relay)

    async def submit(
        self, record: JobRecord, *, follow: bool, priority: int = keys.CHAT_PRIORITY
    ) -> Subscription | None:
        """Record and queue a client's job. With `follow`, its channel is subscribed
        before the job is queued; the subscription is returned. A job that could not be
        queued is refused to the client, and ended so that it never runs."""
        subscription = await self.relay.subscribe(keys.job_channel(record.id)) if follow else None
        try:
            await self.enqueue(record, priority)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if subscription is not None:
                    await self.relay.unsubscribe(subscription)
                await self.cancel(record.id, quiet=True)
            if isinstance(exc, RedisError):
                raise ServiceUnavailableError("cannot reach Redis") from exc
            raise
        return subscription

    async def enqueue(self, record: JobRecord, priority: int, ttl: int | None = None) -> bool:
        """Store a job (unless its id exists: a batch line handed out again) and send its
        message. False if the record existed. Should sending fail after the record was
        written, the sweeper sends it later."""
        if record.deadline is None:
            record.deadline = record.created + self.settings.queue_timeout_seconds
        created = await self.store.create(record, ttl)
        if created or await self.store.status(record.id) == JobStatus.queued:
            await self.queue.submit(record.id, record.model, priority)
        return created

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.store.get(job_id)

    def follow(
        self, job_id: str, after: int = -1, subscription: Subscription | None = None
    ) -> AsyncIterator[ChunkEvent]:
        return self.reader.follow(job_id, after, subscription)

    async def cancel(self, job_id: str, quiet: bool = False) -> str:
        """Cancel a job: the status it had. A queued job ends now; a running one is
        aborted by its worker (announced at once, and flagged in the record in case the
        announcement is missed). `quiet`: for clean-up, never raises."""
        try:
            record = await self.store.get(job_id)
            before = "missing" if record is None else await self.store.cancel(record)
            if before == "in_progress":
                await self.redis.publish(keys.CANCEL_CHANNEL, job_id)
        except RedisError:
            if quiet:
                log.warning("could not cancel %s: Redis unreachable", job_id)
                return "unknown"
            raise
        return before
