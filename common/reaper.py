"""Reaper: makes every accepted job end, whatever happens to the processes around it.

Two sweeps, every `reaper_interval_seconds`, by one process at a time (a Redis lock;
every API process and every worker runs a reaper, so jobs are looked after while any
part of the service is alive):

- **Lapsed leases.** A running job is held under a lease its worker renews every
  heartbeat. A job whose lease lapsed (worker killed, hung, cut off from Redis, or
  running it under a name another process also uses) goes back to the queue and its
  message is sent again, up to `max_attempts` attempts in all; then it fails with
  `worker_lost`. A job whose cancellation was pending ends `cancelled`.
- **Overdue queued jobs.** A job still queued `queue_resend_seconds` after it entered
  the queue has its message sent again (then after twice as long, and so on): the
  message may be gone (a requeue that failed during a Redis restart, a worker that
  acknowledged it and died); claims make the duplicates harmless. A job not started by
  its deadline fails with `queue_timeout`, or, when its model has had no live worker
  for `no_worker_timeout_seconds`, with `model_unavailable`: its readers get a clear
  error instead of waiting for a day. A batch's line has its batch's window as deadline
  and waits out a model's absence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from common import keys
from common.errors import ServiceUnavailableError
from common.jobs import JobRecord
from common.jobstore import JobStore
from common.logs import job_fields, log_event
from common.metrics import JOBS_ENDED, REAPER_ACTIONS
from common.settings import Settings

log = logging.getLogger(__name__)

Requeue = Callable[[str, str, int], Awaitable[None]]


class WorkerLostError(ServiceUnavailableError):
    default_code = "worker_lost"


class QueueTimeoutError(ServiceUnavailableError):
    default_code = "queue_timeout"


class ModelUnavailableError(ServiceUnavailableError):
    default_code = "model_unavailable"


def priority_of(batch: str | None) -> int:
    """Broker priority of a job: a batch's line after interactive chat."""
    return keys.BATCH_PRIORITY if batch else keys.CHAT_PRIORITY


# A sweep holds the reaper's lock this long at a time, renewed as it goes (a process that
# dies mid-sweep frees it this long after).
SWEEP_LOCK_SECONDS = 10.0


class _LockLost(Exception):
    """Another process holds the reaper's lock now: this sweep stops."""


class Reaper:
    def __init__(self, store: JobStore, requeue: Requeue, settings: Settings):
        self.store = store
        self.requeue = requeue
        self.settings = settings
        self.interval = settings.reaper_interval_seconds
        # Held while a sweep runs, then for one interval after it (never released): one
        # sweep at a time and at most one per interval, by whichever process gets there
        # first. A sweep outlasting the interval (a loaded process) must not be overlapped
        # by another's: both would reap the same lapsed job, whose `reap` answers the
        # second as the first (its message sent twice). SWEEP_LOCK_SECONDS bounds the wait
        # when the sweeping process dies mid-sweep.
        self._lock = Lock(store.redis, keys.REAPER_LOCK, timeout=max(self.interval, SWEEP_LOCK_SECONDS), blocking=False)
        # A model never seen serving (e.g. Redis lost the record) counts from our start.
        self._since = time.time()
        # While `run` sweeps under the lock: when it last renewed it (None: not under it).
        self._renewed: float | None = None

    async def run(self) -> None:
        while True:
            try:
                if await self._lock.acquire(token=None):
                    self._renewed = time.monotonic()
                    try:
                        await self.sweep()
                    except _LockLost:
                        log.warning("reaper: another process took the sweep over")
                    finally:
                        self._renewed = None
                        with contextlib.suppress(LockError):
                            await self._lock.extend(self.interval, replace_ttl=True)
            except RedisError as exc:
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper sweep failed")
            await asyncio.sleep(self.interval)

    async def _hold(self) -> None:
        """Before each job of a sweep that `run` started under the lock: renew the lock once
        a quarter of its time has passed, so a long sweep (many jobs, a loaded process) is
        not overlapped by another process's; stop the sweep if another has it now."""
        if self._renewed is None or time.monotonic() - self._renewed < SWEEP_LOCK_SECONDS / 4:
            return
        try:
            await self._lock.extend(SWEEP_LOCK_SECONDS, replace_ttl=True)
        except LockError as exc:
            raise _LockLost from exc
        self._renewed = time.monotonic()

    async def sweep(self) -> list[tuple[str, str]]:
        """One pass over both indexes; (job id, action) for every job acted on."""
        return await self.reap_lapsed() + await self.sweep_queued()

    async def reap_lapsed(self) -> list[tuple[str, str]]:
        done: list[tuple[str, str]] = []
        for job_id in await self.store.due(keys.LEASES):
            await self._hold()
            record = await self.store.get(job_id)
            if record is None:
                await self.store.redis.zrem(keys.LEASES, job_id)
                continue
            error = WorkerLostError(
                f"the worker running this job stopped responding {self.settings.max_attempts} time(s); giving up"
            ).to_dict()["error"]
            action = await self.store.reap(record, self.settings.max_attempts, error)
            if action in ("live", "skip", "missing"):
                continue
            # Logs (issue 9): its lease lapsed: back to the queue (`job.requeued`), or ended
            # here (`job.ended`: cancelled when a cancel was pending, failed: worker_lost).
            log_event(
                log,
                "job.requeued" if action == "requeued" else "job.ended",
                level=logging.WARNING,
                **job_fields(record),
                status="queued" if action == "requeued" else action,
                attempt=record.attempt,
                worker=record.worker,
                why="lease_lapsed",
                error_code=error["code"] if action == "failed" else None,
                total_s=None if action == "requeued" else time.time() - record.created,
                by="reaper",
            )
            if action == "requeued":
                await self.requeue(job_id, record.model, priority_of(record.batch))
            # Metrics (issue 9): requeued, or ended here (cancelled, failed: worker_lost).
            if action in ("requeued", "cancelled", "failed"):
                REAPER_ACTIONS.labels(record.model, action).inc()
            if action in ("cancelled", "failed"):
                JOBS_ENDED.labels(record.model, action, str(error["code"]) if action == "failed" else "").inc()
            done.append((job_id, action))
        return done

    async def sweep_queued(self) -> list[tuple[str, str]]:
        due = await self.store.due(keys.QUEUED)
        if not due:
            return []
        now = time.time()
        seen = {keys.text(k): float(v) for k, v in (await self.store.redis.hgetall(keys.MODELS_SEEN)).items()}
        done: list[tuple[str, str]] = []
        for job_id in due:
            await self._hold()
            record = await self.store.get(job_id)
            if record is None:
                await self.store.redis.zrem(keys.QUEUED, job_id)
                continue
            error = self._why_end(record, now, seen.get(record.model))
            action = await self.store.sweep(record, error)
            if action == "wait":
                continue
            if action == "resend":
                await self.requeue(job_id, record.model, priority_of(record.batch))
                REAPER_ACTIONS.labels(record.model, "resent").inc()  # metrics (issue 9)
                # Logs (issue 9): still queued; its message sent again.
                log_event(
                    log,
                    "job.resent",
                    **job_fields(record),
                    resends=record.resends + 1,
                    queued_s=now - (record.queued_at or record.created),
                    by="reaper",
                )
            elif action == "failed":
                # Logs (issue 9): never started; ended here (queue_timeout, model_unavailable).
                log_event(
                    log,
                    "job.ended",
                    level=logging.WARNING,
                    **job_fields(record),
                    status="failed",
                    attempt=record.attempt,
                    error_code=(error or {}).get("code"),
                    queued_s=now - (record.queued_at or record.created),
                    total_s=now - record.created,
                    by="reaper",
                )
                # Metrics (issue 9): ended here (queue_timeout or model_unavailable).
                REAPER_ACTIONS.labels(record.model, "expired").inc()
                JOBS_ENDED.labels(record.model, "failed", str((error or {}).get("code") or "")).inc()
            done.append((job_id, action))
        return done

    def _why_end(self, record: JobRecord, now: float, seen: float | None) -> dict[str, object] | None:
        """The error a queued job ends with now, or None to keep it queued."""
        queued_at = record.queued_at or record.created
        deadline = record.deadline or (record.created + self.settings.queue_timeout_seconds)
        if now >= deadline:
            return QueueTimeoutError(
                f"no worker for '{record.model}' started this job before its deadline "
                f"({deadline - record.created:.0f} s after it was created)"
            ).to_dict()["error"]
        if record.batch:
            return None  # a batch's line waits for its batch's window, however long the model is away
        grace = self.settings.no_worker_timeout_seconds
        seen = seen if seen is not None else self._since
        if now - seen >= grace and now - queued_at >= grace:
            return ModelUnavailableError(
                f"no worker has served '{record.model}' for {now - seen:.0f} s; the job was not started"
            ).to_dict()["error"]
        return None
