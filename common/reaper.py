"""Reaper: finds jobs whose worker stopped beating and re-queues them (or gives up).

A worker refreshes its heartbeat every `heartbeat_seconds`; one silent for
`worker_ttl_seconds` is taken for dead. Each job it was running goes back to `queued`
and to its model's queue, up to `max_attempts` attempts in all; then it fails with a
clear error. A job whose cancellation was pending ends `cancelled`. Every API process
and every worker runs a reaper; a short Redis lock lets one sweep at a time, so jobs are
reaped while any part of the service is alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from common import keys
from common.errors import ServiceError
from common.jobstore import JobStore

log = logging.getLogger(__name__)

Requeue = Callable[[str, str, int], Awaitable[None]]


class WorkerLostError(ServiceError):
    default_code = "worker_lost"


class Reaper:
    def __init__(
        self,
        store: JobStore,
        requeue: Requeue,
        *,
        worker_ttl_seconds: float,
        max_attempts: int,
        interval_seconds: float,
    ):
        self.store = store
        self.requeue = requeue
        self.worker_ttl = worker_ttl_seconds
        self.max_attempts = max_attempts
        self.interval = interval_seconds
        self.owner = uuid.uuid4().hex

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except RedisError as exc:
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper sweep failed")
            await asyncio.sleep(self.interval)

    async def sweep(self) -> list[tuple[str, str]]:
        """One pass; returns (job id, action) for every job it touched."""
        redis = self.store.redis
        if not await redis.set(keys.REAPER_LOCK, self.owner, nx=True, px=int(self.interval * 1000)):
            return []
        done: list[tuple[str, str]] = []
        dead = await redis.zrangebyscore(keys.WORKERS, "-inf", time.time() - self.worker_ttl)
        for raw_worker in dead:
            worker = keys.text(raw_worker)
            for raw_key in await redis.smembers(keys.inflight(worker)):
                job_id = keys.text(raw_key).removeprefix(keys.job(""))
                action = await self._reap(job_id, worker)
                done.append((job_id, action))
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.inflight(worker))
                pipe.zrem(keys.WORKERS, worker)
                await pipe.execute()
        return done

    async def _reap(self, job_id: str, worker: str) -> str:
        error = WorkerLostError(
            f"the worker running this job stopped responding {self.max_attempts} time(s); giving up",
        ).to_dict()
        action = await self.store.reap(job_id, worker, self.max_attempts, error["error"])
        if action == "skip":
            return action
        log.warning("job %s: worker %s lost; %s", job_id, worker, action)
        record = await self.store.get(job_id)
        if record is None:
            return action
        if action == "requeued":
            priority = keys.BATCH_PRIORITY if record.batch else keys.CHAT_PRIORITY
            await self.requeue(job_id, record.model, priority)
            return action
        # failed / cancelled: end the job's stream for whoever follows it.
        await self.store.end_stream(record, error=error if action == "failed" else None)
        if record.batch:
            await self.store.redis.hincrby(keys.batch(record.batch), f"n_{action}", 1)
        return action
