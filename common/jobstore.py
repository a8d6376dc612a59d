"""JobStore: the job record and the job's replay log in Redis, and every state change
made to them. API, workers and the reaper all go through it.

A job's events are appended to its replay log (a list whose index is the event's `seq`)
and published on its channel in one atomic step, fenced by the job's attempt number:
once a job has been handed to another attempt, a late writer from an earlier one is
refused (and told to stop). State changes are Lua scripts, so two parties can never
both win a race (a cancel and a claim, a reaper and a finishing worker).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from common import keys
from common.jobs import ChoiceDelta, ChunkEvent, JobRecord, JobStatus
from common.schemas import Usage

# KEYS: job, log. ARGV: attempt, channel, ttl, seq of the first payload, payload...
# Returns the log length, or -1 when the attempt no longer owns the job (or the log is
# not where it should be). Idempotent: a retried call whose first run went through is a no-op.
_APPEND = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return -1 end
local len = redis.call('LLEN', KEYS[2])
local first = tonumber(ARGV[4])
if len > first then return len end
if len < first then return -1 end
for i = 5, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
  redis.call('PUBLISH', ARGV[2], ARGV[i])
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('LLEN', KEYS[2])
"""

# KEYS: job, worker's inflight set. ARGV: worker id, now.
# Returns the new attempt number, or the current status when the job cannot start.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' then return status end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[1], 'started', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
return attempt
"""

# KEYS: job, log, worker's inflight set[, batch]. ARGV: attempt, channel, ttl, seq, last event,
# batch counter to increment ('' for none), field/value...
# Appends the job's last event and writes its terminal state in one step, if the attempt
# still owns the job. Returns 1 (done, or already done by a retried call) or 0 (lost it).
_FINISH = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local len = redis.call('LLEN', KEYS[2])
local seq = tonumber(ARGV[4])
if len > seq then return 1 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' or status == 'cancelled' or len < seq then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SREM', KEYS[3], KEYS[1])
if KEYS[4] and ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[6], 1) end
return 1
"""

# KEYS: job. ARGV: now. Returns the status the job had.
# queued -> cancelled at once; in_progress -> flagged for its worker to abort.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[1])
elseif status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return status
"""

# KEYS: job, dead worker's inflight set. ARGV: dead worker id, max attempts, now, error json.
# Returns what was done: requeued | failed | cancelled | skip.
_REAP = """
redis.call('SREM', KEYS[2], KEYS[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'in_progress' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 'skip' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', ARGV[3])
  return 'cancelled'
end
if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished', ARGV[3], 'error', ARGV[4])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'requeued', ARGV[3])
return 'requeued'
"""


class JobStore:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int):
        self.redis = redis
        self.ttl = ttl_seconds
        self._append = redis.register_script(_APPEND)
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_CANCEL)
        self._reap = redis.register_script(_REAP)

    async def create(self, record: JobRecord) -> None:
        key = keys.job(record.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record.to_redis())  # type: ignore[arg-type]
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_redis(raw) if raw else None

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self.redis.hget(keys.job(job_id), "status")
        return JobStatus(keys.text(raw)) if raw else None

    async def claim(self, job_id: str, worker_id: str) -> int | str:
        """Start an attempt: returns its number, or the status that prevents starting."""
        result = await self._claim(keys=[keys.job(job_id), keys.inflight(worker_id)], args=[worker_id, time.time()])
        return result if isinstance(result, int) else result.decode()

    async def append(self, job_id: str, attempt: int, events: list[ChunkEvent]) -> int:
        """Append events (consecutive seqs) to the replay log and publish them; -1 if the
        attempt lost the job."""
        return int(
            await self._append(
                keys=[keys.job(job_id), keys.job_log(job_id)],
                args=[attempt, keys.job_channel(job_id), self.ttl, events[0].seq, *(e.encode() for e in events)],
            )
        )

    async def append_in(self, pipe: Any, job_id: str, attempt: int, first_seq: int, payloads: list[str]) -> None:
        """The same as `append`, queued on a pipeline (the publisher batches many jobs)."""
        await self._append(
            keys=[keys.job(job_id), keys.job_log(job_id)],
            args=[attempt, keys.job_channel(job_id), self.ttl, first_seq, *payloads],
            client=pipe,
        )

    async def log(self, job_id: str, start: int = 0, end: int = -1) -> list[ChunkEvent]:
        return [ChunkEvent.decode(raw) for raw in await self.redis.lrange(keys.job_log(job_id), start, end)]

    async def end_stream(self, record: JobRecord, error: dict[str, Any] | None = None) -> None:
        """Write the last event of a job no worker will finish (cancelled while queued, or
        given up by the reaper) after whatever earlier attempts sent: an error, or else a
        `done` with every choice cancelled and the tokens sent so far as usage."""
        previous = await self.log(record.id)
        if error is not None:
            event = ChunkEvent(seq=len(previous), kind="error", attempt=record.attempt, error=error)
        else:
            n = record.request.sampling.n if record.request else 1
            prompt = len(record.request.prompt_token_ids) if record.request else 0
            sent = sum(len(c.token_ids) for e in previous for c in e.choices)
            event = ChunkEvent(
                seq=len(previous),
                kind="done",
                attempt=record.attempt,
                choices=[ChoiceDelta(index=i, finish_reason="cancelled") for i in range(n)],
                usage=Usage(prompt_tokens=prompt, completion_tokens=sent, total_tokens=prompt + sent),
            )
        await self.append(record.id, record.attempt, [event])

    async def finish_in(
        self,
        pipe: Any,
        job_id: str,
        worker_id: str,
        attempt: int,
        event: str,
        seq: int,
        fields: dict[str, Any],
        batch: str | None = None,
    ) -> None:
        """Queue the job's last event and its terminal record fields, as one step; for a
        batch's job, count it in the batch's `n_<status>`."""
        counter = f"n_{fields['status']}" if batch else ""
        values: list[Any] = [attempt, keys.job_channel(job_id), self.ttl, seq, event, counter]
        for name, value in fields.items():
            if value is not None:
                values += [name, value if isinstance(value, str | int | float) else json.dumps(value)]
        job_keys = [keys.job(job_id), keys.job_log(job_id), keys.inflight(worker_id)]
        if batch:
            job_keys.append(keys.batch(batch))
        await self._finish(keys=job_keys, args=values, client=pipe)

    async def cancel(self, job_id: str) -> str:
        return (await self._cancel(keys=[keys.job(job_id)], args=[time.time()])).decode()

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "cancel_requested")
            flags = await pipe.execute()
        return {j for j, f in zip(job_ids, flags, strict=True) if f == b"1"}

    async def reap(self, job_id: str, dead_worker: str, max_attempts: int, error: dict[str, Any]) -> str:
        result = await self._reap(
            keys=[keys.job(job_id), keys.inflight(dead_worker)],
            args=[dead_worker, max_attempts, time.time(), json.dumps(error)],
        )
        return result.decode()
