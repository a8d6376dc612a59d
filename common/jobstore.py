"""JobStore: the job record, its replay log and the job indexes in Redis, and every state
change made to them. API, workers, the reaper and the batch runner all go through it.

A job's life: `create` (queued, in the QUEUED index) -> `claim` (in_progress under a
lease, in the LEASES index; the attempt number goes up) -> `append`... -> one terminal
write (completed, failed or cancelled), or back to queued by `release` (its worker gives
it up) or `reap` (its lease lapsed). Every step is one Lua script, so two parties can
never both win a race (a cancel and a claim, a reaper and a finishing worker), and every
script answers the same when run twice (redis-py retries a command whose reply was lost;
see `common.redis_client`): claims carry a token, reaps record the attempt they took
back, terminal writes check the log, batch progress goes into sets.

Fencing: a worker's writes (append, finish, renew, release) name the attempt they belong
to and count only while the job is `in_progress` in that attempt. Once a job has been
taken back or handed to another attempt, a late writer is refused (and told to stop).

Every terminal write appends the job's last event (`done` or `error`) to its log and
publishes it in the same step, so readers always see an end. For a batch's line it also
records the line in the batch's per-status set, frees its batch slot and announces it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from common import keys
from common.coalesce import Coalescer
from common.jobs import ChunkEvent, JobRecord, JobStatus

# Shared by the scripts that can end a job. KEYS: 1 job, 2 log, 3 leases, 4 queued,
# 5 the model's waiting jobs, 6 the owner's active jobs, [7 batch record, 8 batch slots
# of the model] (only for a batch's line).
_LIB = """
local function tokens_sent()
  local sent = 0
  for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local ev = cjson.decode(raw)
    if type(ev.choices) == 'table' then
      for _, c in ipairs(ev.choices) do
        if type(c.token_ids) == 'table' then sent = sent + #c.token_ids end
      end
    end
  end
  return sent
end
local function cancelled_event(seq, attempt, n, prompt)
  local choices = {}
  for i = 0, n - 1 do choices[#choices + 1] = '{"index":' .. i .. ',"finish_reason":"cancelled"}' end
  local sent = tokens_sent()
  return '{"seq":' .. seq .. ',"kind":"done","attempt":' .. attempt .. ',"choices":[' .. table.concat(choices, ',')
    .. '],"usage":{"prompt_tokens":' .. prompt .. ',"completion_tokens":' .. sent
    .. ',"total_tokens":' .. (prompt + sent) .. '}}'
end
local function error_event(seq, attempt, err)
  return '{"seq":' .. seq .. ',"kind":"error","attempt":' .. attempt .. ',"error":' .. err .. '}'
end
-- Append the last event, set the terminal status, drop the job from the indexes.
local function end_job(job_id, status, now, event, channel, ttl, progress)
  redis.call('RPUSH', KEYS[2], event)
  redis.call('PUBLISH', channel, event)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('HSET', KEYS[1], 'status', status, 'finished', now)
  redis.call('ZREM', KEYS[3], job_id)
  redis.call('ZREM', KEYS[4], job_id)
  redis.call('ZREM', KEYS[5], job_id)
  redis.call('SREM', KEYS[6], job_id)
  if #KEYS >= 8 then
    redis.call('SADD', KEYS[7] .. ':' .. status, job_id)
    redis.call('SREM', KEYS[8], job_id)
    redis.call('PUBLISH', progress, KEYS[7])
  end
end
"""

# KEYS: job, queued, the model's waiting jobs, the owner's active jobs. ARGV: ttl, next
# check, job id, now, interactive (1/0), max waiting, max active (0: no limit), field,
# value, ... Writes a new record: {1, waiting} (an interactive job under a waiting
# limit: the model's waiting jobs with it; else 0); or nothing: {0, 0} if it exists (a
# batch line handed out again), {-1, waiting} if the model has too many interactive jobs
# waiting, {-2, active} if the owner has too many interactive jobs queued or running.
# Admission and writing are one step, so a burst cannot slip past a limit.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local interactive = ARGV[5] == '1'
local waiting = -1
if interactive then
  local max_waiting, max_active = tonumber(ARGV[6]), tonumber(ARGV[7])
  if max_waiting > 0 then
    waiting = redis.call('ZCARD', KEYS[3])
    if waiting >= max_waiting then return {-1, waiting} end
  end
  if max_active > 0 then
    local active = redis.call('SCARD', KEYS[4])
    if active >= max_active then return {-2, active} end
  end
end
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  if interactive then
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
    redis.call('EXPIRE', KEYS[3], ARGV[1])
    redis.call('SADD', KEYS[4], ARGV[3])
    redis.call('EXPIRE', KEYS[4], ARGV[1])
    if waiting >= 0 then waiting = waiting + 1 end
  end
end
return {1, math.max(waiting, 0)}
"""

# KEYS: job, leases, queued, the model's waiting jobs, the model's starts in this time
# bucket. ARGV: job id, worker, now, lease until, claim token. The new attempt's number,
# or the status that prevents starting. The same token again (a retried call) answers
# the same attempt. Starts are counted per time bucket: the queue's drain rate.
_CLAIM = """
local st = redis.call('HMGET', KEYS[1], 'status', 'claim', 'attempt')
if not st[1] then redis.call('ZREM', KEYS[3], ARGV[1]) return 'missing' end
if st[1] == 'in_progress' and st[2] == ARGV[5] then return tonumber(st[3]) end
if st[1] ~= 'queued' then return st[1] end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[2], 'started', ARGV[3], 'lease', ARGV[4],
  'claim', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], 120)
return attempt
"""

# KEYS: leases, job... ARGV: worker, lease until, attempt..., job id...
# Extends the leases the worker still holds; answers 1 for each job it no longer holds.
_RENEW = """
local n = #KEYS - 1
local lost = {}
for i = 1, n do
  local st = redis.call('HMGET', KEYS[i + 1], 'status', 'attempt', 'worker')
  if st[1] == 'in_progress' and st[2] == ARGV[2 + i] and st[3] == ARGV[1] then
    redis.call('HSET', KEYS[i + 1], 'lease', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[2 + n + i])
    lost[i] = 0
  else
    lost[i] = 1
  end
end
return lost
"""

# KEYS: job, log, job, log... (a pair per job). ARGV: ttl, then per job: attempt, channel,
# seq of the first payload, how many payloads, the payloads. Per job, the log's length, or
# -1 when the attempt no longer holds the job (or the log is not where it should be). A
# retried call whose first run went through is a no-op. All the jobs a worker publishes
# for at once go in one call (one call a job was a Redis script run, and a command the
# worker packs and an answer it parses, for every token of every stream).
_APPEND = """
local ttl = ARGV[1]
local out = {}
local a = 2
for k = 1, #KEYS, 2 do
  local attempt, channel, first, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local p = a + 4
  a = p + n
  local st = redis.call('HMGET', KEYS[k], 'attempt', 'status')
  local res = -1
  if st[1] == attempt then
    local len = redis.call('LLEN', KEYS[k + 1])
    if len > first then
      res = len
    elseif st[2] == 'in_progress' and len == first then
      for i = p, a - 1 do
        res = redis.call('RPUSH', KEYS[k + 1], ARGV[i])
        redis.call('PUBLISH', channel, ARGV[i])
      end
      redis.call('EXPIRE', KEYS[k + 1], ttl)
    end
  end
  out[#out + 1] = res
end
return out
"""

# ARGV: attempt, channel, ttl, seq, last event, job id, now, progress channel, field, value...
# The worker's end of a job: its last event and terminal fields in one step, if the
# attempt still holds the job. 1 (done, or done by an earlier run of this call) or 0.
_FINISH = (
    _LIB
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if st[1] ~= ARGV[1] then return 0 end
local len = redis.call('LLEN', KEYS[2])
local seq = tonumber(ARGV[4])
if len > seq then return 1 end
if st[2] ~= 'in_progress' or len < seq then return 0 end
local status = 'completed'
for i = 9, #ARGV, 2 do
  if ARGV[i] == 'status' then status = ARGV[i + 1] else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('HDEL', KEYS[1], 'lease')
end_job(ARGV[6], status, ARGV[7], ARGV[5], ARGV[2], ARGV[3], ARGV[8])
return 1
"""
)

# KEYS: job, leases, queued, the model's waiting jobs. ARGV: job id, attempt, worker, now,
# next check.
# A worker gives a job back (its engine died, it is shutting down, its log went short):
# queued again for another attempt. 2 if given back now, 1 if it was already (by an
# earlier run of this call), 0 if the attempt does not hold it.
_RELEASE = """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker')
if st[2] ~= ARGV[2] or st[3] ~= ARGV[3] then return 0 end
if st[1] == 'queued' then return 1 end
if st[1] ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'queued_at', ARGV[4], 'requeued', ARGV[4])
redis.call('HDEL', KEYS[1], 'lease', 'claim')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'batch') == 0 then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1]) end
return 2
"""

# ARGV: job id, now, channel, ttl, n, prompt tokens, progress channel.
# queued -> cancelled at once, with its last event; in_progress -> flagged for its worker
# to abort. Answers the status the job had (run again: `cancelled`).
_CANCEL = (
    _LIB
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not st[1] then return 'missing' end
if st[1] == 'queued' then
  local event = cancelled_event(redis.call('LLEN', KEYS[2]), st[2], tonumber(ARGV[5]), tonumber(ARGV[6]))
  end_job(ARGV[1], 'cancelled', ARGV[2], event, ARGV[3], ARGV[4], ARGV[7])
elseif st[1] == 'in_progress' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return st[1]
"""
)

# ARGV: job id, now, max attempts, channel, ttl, n, prompt tokens, error json, progress
# channel, next check. A job whose lease lapsed: back to the queue (`requeued`), or ended
# (`cancelled` when a cancel was pending, `failed` when its attempts are used up), or
# `live` (renewed meanwhile) / `skip` (not running). Run again, it answers the same.
_REAP = (
    _LIB
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'lease', 'cancel_requested', 'reaped')
if not st[1] then redis.call('ZREM', KEYS[3], ARGV[1]) return 'missing' end
if st[1] ~= 'in_progress' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  if st[5] and st[5] == st[2] then
    if st[1] == 'queued' then return 'requeued' end
    return st[1]
  end
  return 'skip'
end
if tonumber(st[3] or '0') > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[3], st[3], ARGV[1])
  return 'live'
end
redis.call('HSET', KEYS[1], 'reaped', st[2])
local seq = redis.call('LLEN', KEYS[2])
if st[4] == '1' then
  end_job(ARGV[1], 'cancelled', ARGV[2], cancelled_event(seq, st[2], tonumber(ARGV[6]), tonumber(ARGV[7])),
    ARGV[4], ARGV[5], ARGV[9])
  return 'cancelled'
end
if tonumber(st[2]) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'error', ARGV[8])
  end_job(ARGV[1], 'failed', ARGV[2], error_event(seq, st[2], ARGV[8]), ARGV[4], ARGV[5], ARGV[9])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'queued_at', ARGV[2], 'requeued', ARGV[2])
redis.call('HDEL', KEYS[1], 'lease', 'claim')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[10], ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'batch') == 0 then redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1]) end
return 'requeued'
"""
)

# ARGV: job id, now, next check, channel, ttl, error json ('' to keep it queued), progress
# channel, resend base seconds. A queued job the sweeper looks at: `resend` (still queued,
# its message is due to be sent again: after the base, then twice as long each time, so a
# job waiting in a long queue collects a few duplicates, not one per look), `wait` (still
# queued, not due), `failed` (ended with the error: no capacity before its deadline) or
# `skip` (not queued).
_SWEEP = (
    _LIB
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'resend_at')
if st[1] ~= 'queued' then redis.call('ZREM', KEYS[4], ARGV[1]) return 'skip' end
if ARGV[6] == '' then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
  if tonumber(ARGV[2]) < tonumber(st[3] or '0') then return 'wait' end
  local k = redis.call('HINCRBY', KEYS[1], 'resends', 1)
  redis.call('HSET', KEYS[1], 'resend_at', tonumber(ARGV[2]) + tonumber(ARGV[8]) * 2 ^ math.min(k, 6))
  return 'resend'
end
redis.call('HSET', KEYS[1], 'error', ARGV[6])
end_job(ARGV[1], 'failed', ARGV[2], error_event(redis.call('LLEN', KEYS[2]), st[2], ARGV[6]), ARGV[4], ARGV[5], ARGV[7])
return 'failed'
"""
)


def new_claim_token() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, resend_seconds: float = 30.0):
        self.redis = redis
        self.ttl = ttl_seconds
        self.resend_seconds = resend_seconds
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._append = redis.register_script(_APPEND)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)
        self._cancel = redis.register_script(_CANCEL)
        self._reap = redis.register_script(_REAP)
        self._sweep = redis.register_script(_SWEEP)
        self._claims: Coalescer[tuple[str, str, str, str, float], tuple[int | str, JobRecord | None]]
        self._claims = Coalescer(self._claim_many, limit=128)

    @staticmethod
    def ending_keys(job_id: str, model: str, batch: str | None, owner: str = "") -> list[str]:
        """The keys a script that may end the job touches (see `_LIB`)."""
        out = [
            keys.job(job_id),
            keys.job_log(job_id),
            keys.LEASES,
            keys.QUEUED,
            keys.waiting(model),
            keys.active(owner),
        ]
        if batch:
            out += [keys.batch(batch), keys.batch_slots(model)]
        return out

    @staticmethod
    def _shape(record: JobRecord) -> tuple[int, int]:
        """(n, prompt tokens): what a `done` event written for the job needs."""
        if record.request is None:
            return 1, 0
        return record.request.choices, record.request.prompt_tokens

    # -- creating and reading ------------------------------------------------------------

    async def create(
        self, record: JobRecord, ttl: int | None = None, max_waiting: int = 0, max_active: int = 0
    ) -> tuple[int, int]:
        """Store a new job (queued jobs also enter the QUEUED index; interactive ones, not
        a batch's lines, the model's waiting jobs and the owner's active jobs). Answers
        (1, waiting) if stored (with `max_waiting`, the model's waiting jobs, this one
        among them; else 0), (0, 0) if a record with its id exists already (it is left as
        it is); or, for an interactive job, (-1, waiting) when its model has `max_waiting`
        jobs waiting, (-2, active) when its owner has `max_active` jobs queued or running
        (nothing written; 0: no limit)."""
        code, count = await self._create(*self._create_call(record, ttl, max_waiting, max_active))
        return int(code), int(count)

    async def create_lines(self, records: list[JobRecord], ttl: int | None = None) -> list[int]:
        """Store a group of a batch's lines (queued, or failed at validation) in one round
        trip, each as `create` would (no admission limits: a line holds a batch slot).
        Answers each one's code: 1 stored, 0 its record exists already (handed out
        again after a restart)."""
        if not records:
            return []
        calls = [self._create_call(record, ttl, 0, 0) for record in records]

        async def fill(pipe: Pipeline) -> None:
            for script_keys, args in calls:
                await self._run_in(pipe, self._create, script_keys, args)

        # (Every create answers the same when run twice.)
        answers = await self._pipelined(fill, self._create)
        return [int(code) for code, _ in answers]

    async def _pipelined(self, fill: Callable[[Pipeline], Awaitable[None]], *scripts: AsyncScript) -> list[Any]:
        """Run the pipeline `fill` builds (its scripts queued by SHA, `_run_in`); if Redis
        lost the `scripts` (restarted: NoScriptError, nothing in it ran), load them and run
        it once more."""
        for attempt in range(2):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    await fill(pipe)
                    return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                for script in scripts:
                    await self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    def _create_call(
        self, record: JobRecord, ttl: int | None, max_waiting: int, max_active: int
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of `_CREATE` for `record`."""
        now = time.time()
        if record.status == JobStatus.queued and record.queued_at is None:
            record.queued_at = now
        interactive = record.batch is None
        args: list[Any] = [
            ttl or self.ttl,
            now + self.resend_seconds,
            record.id,
            now,
            1 if interactive else 0,
            max_waiting,
            max_active,
        ]
        for name, value in record.to_redis().items():
            args += [name, value]
        return [keys.job(record.id), keys.QUEUED, keys.waiting(record.model), keys.active(record.owner)], args

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_redis(raw) if raw else None

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self.redis.hget(keys.job(job_id), "status")
        return JobStatus(keys.text(raw)) if raw else None

    async def log(self, job_id: str, start: int = 0, end: int = -1) -> list[ChunkEvent]:
        return [ChunkEvent.decode(raw) for raw in await self.redis.lrange(keys.job_log(job_id), start, end)]

    # -- the worker's side ----------------------------------------------------------------

    async def claim(self, job_id: str, model: str, worker_id: str, token: str, lease_seconds: float) -> int | str:
        """Start an attempt under a lease: its number, or the status that prevents it."""
        script_keys, args = self._claim_call(job_id, model, worker_id, token, lease_seconds)
        result = await self._claim(keys=script_keys, args=args)
        return result if isinstance(result, int) else keys.text(result)

    @staticmethod
    def _claim_call(
        job_id: str, model: str, worker_id: str, token: str, lease_seconds: float
    ) -> tuple[list[str], list[Any]]:
        now = time.time()
        script_keys = [keys.job(job_id), keys.LEASES, keys.QUEUED, keys.waiting(model), keys.started(model, now)]
        return script_keys, [job_id, worker_id, now, now + lease_seconds, token]

    async def claim_record(
        self, job_id: str, model: str, worker_id: str, token: str, lease_seconds: float
    ) -> tuple[int | str, JobRecord | None]:
        """`claim`, and the record as it is right after it, in one round trip (a worker
        read the record in a second one for every job: about 4% of its CPU under load).
        Claims made while one is in flight go out together in the next round trip (a
        `Coalescer`: under load a worker's jobs arrive many a millisecond, and a round trip
        each was a quarter of its CPU under a batch). An error fails the claims of that
        round trip alike; whether they ran is unknown (see the worker's retry)."""
        return await self._claims((job_id, model, worker_id, token, lease_seconds))

    async def _claim_many(
        self, calls: list[tuple[str, str, str, str, float]]
    ) -> list[tuple[int | str, JobRecord | None]]:
        """Several `claim_record`s in one pipeline."""

        async def fill(pipe: Pipeline) -> None:
            for call in calls:
                script_keys, args = self._claim_call(*call)
                await self._run_in(pipe, self._claim, script_keys, args)
                pipe.hgetall(keys.job(call[0]))

        answers = await self._pipelined(fill, self._claim)
        out: list[tuple[int | str, JobRecord | None]] = []
        for result, raw in zip(answers[::2], answers[1::2], strict=True):
            claimed = result if isinstance(result, int) else keys.text(result)
            out.append((claimed, JobRecord.from_redis(raw) if raw else None))
        return out

    async def renew(self, worker_id: str, held: dict[str, int], lease_seconds: float) -> set[str]:
        """Extend the leases of the jobs (id -> attempt) a worker runs; the ids it no
        longer holds."""
        if not held:
            return set()
        ids = list(held)
        lost = await self._renew(
            keys=[keys.LEASES, *(keys.job(j) for j in ids)],
            args=[worker_id, time.time() + lease_seconds, *(held[j] for j in ids), *ids],
        )
        return {j for j, flag in zip(ids, lost, strict=True) if int(flag)}

    async def append(self, job_id: str, attempt: int, first_seq: int, payloads: list[str]) -> int:
        """Append events (consecutive seqs from `first_seq`) to the replay log and publish
        them; -1 if the attempt no longer holds the job."""
        answer = await self.append_in(self.redis, [(job_id, attempt, first_seq, payloads)])
        return int(answer[0])

    async def append_in(self, client: Any, appends: list[tuple[str, int, int, list[str]]]) -> Any:
        """`append` for several jobs (job id, attempt, first seq, payloads) in one script
        call, on a client or queued on a pipeline (the publisher's): its answer is a list,
        an `append`'s answer per job."""
        script_keys: list[str] = []
        args: list[Any] = [self.ttl]
        for job_id, attempt, first_seq, payloads in appends:
            script_keys += [keys.job(job_id), keys.job_log(job_id)]
            args += [attempt, keys.job_channel(job_id), first_seq, len(payloads), *payloads]
        return await self._run_in(client, self._append, script_keys, args)

    @staticmethod
    async def _run_in(client: Any, script: Any, script_keys: list[str], args: list[Any]) -> Any:
        """A script on `client`. On a pipeline it is queued by its SHA alone: redis-py would
        otherwise ask Redis whether the scripts exist (SCRIPT EXISTS) on every execute, one
        more round trip per publish. A pipeline that meets a Redis without them (restarted)
        raises NoScriptError; its caller loads them (`load_scripts`) and runs it again
        (every script answers the same when run twice)."""
        if isinstance(client, Pipeline):
            return await client.evalsha(script.sha, len(script_keys), *script_keys, *args)
        return await script(keys=script_keys, args=args, client=client)

    async def load_scripts(self) -> None:
        """Load the scripts a worker's pipelines run by SHA (after a NoScriptError)."""
        for script in (self._append, self._finish):
            await self.redis.script_load(script.script)

    async def finish_in(
        self,
        pipe: Any,
        job_id: str,
        model: str,
        attempt: int,
        event: str,
        seq: int,
        fields: dict[str, Any],
        batch: str | None = None,
        owner: str = "",
    ) -> Any:
        """Queue the job's last event and its terminal record fields (`status` among
        them), as one step."""
        values: list[Any] = [
            attempt,
            keys.job_channel(job_id),
            self.ttl,
            seq,
            event,
            job_id,
            time.time(),
            keys.BATCH_PROGRESS,
        ]
        for name, value in fields.items():
            if value is not None:
                values += [name, value if isinstance(value, str | int | float) else json.dumps(value)]
        return await self._run_in(pipe, self._finish, self.ending_keys(job_id, model, batch, owner), values)

    async def release(self, job_id: str, model: str, attempt: int, worker_id: str, due_in: float | None = None) -> int:
        """Give a job back to the queue: 2 if given back now (the caller then sends its
        message, or leaves that to the sweep once it is due, `due_in` seconds from now;
        None: `resend_seconds`, a backstop for a message that was lost), 1 if it already
        was (if that message was lost, the sweeper resends it), 0 if the attempt does not
        hold the job."""
        now = time.time()
        due = now + (self.resend_seconds if due_in is None else due_in)
        return int(
            await self._release(
                keys=[keys.job(job_id), keys.LEASES, keys.QUEUED, keys.waiting(model)],
                args=[job_id, attempt, worker_id, now, due],
            )
        )

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "cancel_requested")
            flags = await pipe.execute()
        return {j for j, f in zip(job_ids, flags, strict=True) if f == b"1"}

    # -- the API's and the reaper's side --------------------------------------------------

    async def cancel(self, record: JobRecord) -> str:
        """Cancel a job: the status it had (`queued`: it ended now; `in_progress`: its
        worker is to abort it)."""
        n, prompt = self._shape(record)
        result = await self._cancel(
            keys=self.ending_keys(record.id, record.model, record.batch, record.owner),
            args=[record.id, time.time(), keys.job_channel(record.id), self.ttl, n, prompt, keys.BATCH_PROGRESS],
        )
        return keys.text(result)

    async def reap(self, record: JobRecord, max_attempts: int, error: dict[str, Any]) -> str:
        """Take back a job whose lease lapsed (see `_REAP`)."""
        n, prompt = self._shape(record)
        now = time.time()
        result = await self._reap(
            keys=self.ending_keys(record.id, record.model, record.batch, record.owner),
            args=[
                record.id,
                now,
                max_attempts,
                keys.job_channel(record.id),
                self.ttl,
                n,
                prompt,
                json.dumps(error),
                keys.BATCH_PROGRESS,
                now + self.resend_seconds,
            ],
        )
        return keys.text(result)

    async def sweep(self, record: JobRecord, error: dict[str, Any] | None) -> str:
        """Look at a queued job: keep it (`resend` its message, or `wait`), or end it
        with `error` (`failed`)."""
        now = time.time()
        result = await self._sweep(
            keys=self.ending_keys(record.id, record.model, record.batch, record.owner),
            args=[
                record.id,
                now,
                now + self.resend_seconds,
                keys.job_channel(record.id),
                self.ttl,
                json.dumps(error) if error is not None else "",
                keys.BATCH_PROGRESS,
                self.resend_seconds,
            ],
        )
        return keys.text(result)

    async def due(self, index: str, limit: int = 500) -> list[str]:
        """Job ids in LEASES (lease lapsed) or QUEUED (due a look) whose time has come."""
        return [keys.text(j) for j in await self.redis.zrangebyscore(index, "-inf", time.time(), start=0, num=limit)]
