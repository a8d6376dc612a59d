"""BatchRunner: drives each batch through validating -> in_progress -> finalizing ->
completed (or cancelling -> cancelled, or expired), from any API process.

Lines run as ordinary jobs through the job pipeline, queued at a lower broker priority.
A line is handed out only once it holds a batch slot of its model: an atomic
reservation against `BATCH_SLOT_SHARE` of that model's live worker slots, shared by all
batches and API processes, so batches together never take the share interactive chat
keeps. A line's slot is freed by the same script that ends its job. The runner sleeps
until a line ends (the job core announces it on `BATCH_PROGRESS`) or a client acts,
rather than polling.

Lines go out in pipelined groups, as many as there are free slots (at most `GROUP`): a
group is read, validated and tokenized ahead, its slots reserved in one script call, its
job records written in one round trip, its Celery messages sent in one pipeline, and the
high-water mark moved past it once they are out (several lines a message: a worker
takes them together). Lines prepared but without a slot wait
in memory for the next turn (a restart prepares them again: every step is idempotent).

A batch's state lives in Redis (record, `dispatched` high-water mark, per-status sets
of ended lines, deterministic job ids per line), so any API process can pick it up
after a restart; a lock lets one drive it at a time. Output and error files are
written once, at the end, from the job records.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from api.batches.input import InputLine, iter_lines, line_job_id, scan_input
from api.batches.records import read_batch, set_fields
from api.batches.results import write_results
from api.endpoints.chat import ChatAdapter
from api.endpoints.completions import CompletionAdapter
from api.endpoints.responses import ResponsesAdapter
from api.errors import _union_tag
from api.files import FileStore
from api.jobs.pipeline import JobPipeline
from common import keys
from common.batches import BatchErrors, BatchObject, BatchStatus
from common.errors import InvalidRequestError, ServiceError
from common.jobs import JobRecord, JobStatus
from common.logs import job_fields, log_event
from common.responses import ResponsesRequest
from common.schemas import ChatCompletionRequest, CompletionRequest
from common.settings import Settings
from common.tasks import cancel_and_wait
from common.workers import live_workers

log = logging.getLogger(__name__)
LOCK_SECONDS = 30
# The most lines prepared and handed out in one turn.
GROUP = 256
# Lines prepared in a batch's first turn, before its model (and so its free slots) is known.
FIRST_GROUP = 32
# Lines whose job status is read per round trip when a stopping batch cancels its lines.
STATUS_CHUNK = 500
# A stopping batch looks again for lines to cancel this often (one may have been missed).
RESTOP_SECONDS = 10.0
# How long a woken runner waits for more slots to free up before its next turn. (5 ms
# before lines went several to a message; now they end in groups, and on the fake-engine
# bench 1-2 ms gave about 1,200 lines/s, 5 ms about 1,000, none about 1,050.)
COALESCE_SECONDS = 0.002
# How long a model's batch capacity (from its live workers) is used before it is read again.
CAPACITY_SECONDS = 1.0
# The most lines in one Celery message (`JobQueue.submit_groups`).
MESSAGE_LINES = 16

# KEYS: the model's batch slots, BATCH_SLOT_SETS (lists the first). ARGV: capacity, job
# id... How many of the jobs, in order, hold a slot (now, or already: a retried call or a line handed out again); it
# stops at the first for which none is free.
_RESERVE = """
redis.call('SADD', KEYS[2], KEYS[1])
local cap = tonumber(ARGV[1])
local held = 0
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    if redis.call('SCARD', KEYS[1]) >= cap then return held end
    redis.call('SADD', KEYS[1], ARGV[i])
  end
  held = held + 1
end
return held
"""

# KEYS: the batch's record. ARGV: a line index. Raises the batch's `n_handing` mark to it:
# the lines below it may have records (a group's records are written before its messages
# go out and `n_dispatched` moves past it), so a stop covers them too.
_RAISE_HANDING = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'n_handing') or '0')
if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'n_handing', ARGV[1]) end
"""


def _validation_error(exc: ValidationError) -> InvalidRequestError:
    """A line's invalid body as the 400 the endpoint would answer (`param` named as there)."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not _union_tag(p))
    extra = (first.get("ctx") or {}).get("param")
    if isinstance(extra, str) and extra:
        param = ".".join(p for p in (param, extra) if p)
    return InvalidRequestError(str(first["msg"]), param=param or None)


@dataclass
class _Line:
    """An input line made ready to hand out: its job record (queued), or, for an invalid
    line, its record as failed and the error."""

    index: int
    record: JobRecord
    error: ServiceError | None = None


class _Lines:
    """A batch's remaining input lines, read from its file in groups (off the event loop),
    and those prepared that found no slot yet (`held`, in order)."""

    def __init__(self, path: Path, start: int):
        self._lines: Iterator[tuple[int, InputLine]] = iter_lines(path, start)
        self.held: list[_Line] = []
        self.eof = False
        self.model: str | None = None  # the model of the last valid line: whose slots to look at

    async def read(self, n: int) -> list[tuple[int, InputLine]]:
        items = await asyncio.to_thread(lambda: list(itertools.islice(self._lines, n)))
        if len(items) < n:
            self.eof = True
        return items

    @property
    def done(self) -> bool:
        """Every line has been handed out."""
        return self.eof and not self.held


class BatchRunner:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        files: FileStore,
        chat: ChatAdapter,
        pipeline: JobPipeline,
        completions: CompletionAdapter | None = None,
        responses: ResponsesAdapter | None = None,
    ):
        self.settings = settings
        self.redis = redis
        self.files = files
        self.chat = chat
        self.completions = completions
        self.responses = responses
        self.pipeline = pipeline
        self.owner = uuid.uuid4().hex
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._reserve = redis.register_script(_RESERVE)
        self._raise_handing = redis.register_script(_RAISE_HANDING)
        self._capacities: dict[str, tuple[float, int, int]] = {}
        # Slot holders seen without a record at the last `prune_slots` pass.
        self._missing: set[str] = set()
        # The slot sets are listed in keys.BATCH_SLOT_SETS (by the reserving script); the
        # first pass also looks for sets an older version left unlisted.
        self._slot_sets_seeded = False

    # -- scheduling ---------------------------------------------------------------------

    def start(self, batch_id: str) -> None:
        task = self._runners.get(batch_id)
        if task is None or task.done():
            self._wakeups[batch_id] = asyncio.Event()
            self._runners[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch-{batch_id}")

    def wake(self, batch_id: str | None = None) -> None:
        """Something changed for `batch_id` (None: for every batch, e.g. a slot freed)."""
        for bid, event in self._wakeups.items():
            if batch_id is None or bid == batch_id:
                event.set()

    async def supervise(self, interval: float = 5.0) -> None:
        """Drive every unfinished batch, including those a stopped API process left, and
        hand back the slots of lines whose jobs vanished."""
        while True:
            try:
                for raw in await self.redis.smembers(keys.ACTIVE_BATCHES):
                    batch_id = keys.text(raw)
                    status = await self.redis.hget(keys.batch(batch_id), "status")
                    if status is None or BatchStatus(keys.text(status)).terminal:
                        await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)
                    else:
                        self.start(batch_id)
                await self.prune_slots()
            except Exception as exc:
                log.warning("batch supervisor: %s", exc)
            await asyncio.sleep(interval)

    async def prune_slots(self) -> None:
        """Free slots held by lines whose job has ended or is gone (e.g. expired). A line
        without a record is freed only when it had none at this process's previous pass
        too: a runner reserves a group's slots a moment before it writes their records,
        and freeing one in between let the batch run past its share."""
        missing: set[str] = set()
        if not self._slot_sets_seeded:
            # Slot sets written before they were listed (an older version): listed once.
            # (Every pass was a SCAN of the whole keyspace, ten keys a round trip, every 5 s
            # in every API process: 2% of an API's CPU under load with a day of job keys.)
            found = [keys.text(raw) async for raw in self.redis.scan_iter(match=keys.batch_slots("*"), count=1000)]
            if found:
                await self.redis.sadd(keys.BATCH_SLOT_SETS, *found)
            self._slot_sets_seeded = True
        for raw in await self.redis.smembers(keys.BATCH_SLOT_SETS):
            slots = keys.text(raw)
            members = [keys.text(m) for m in await self.redis.smembers(slots)]
            if not members:
                continue
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in members:
                    pipe.hget(keys.job(job_id), "status")
                statuses = await pipe.execute()
            stale = []
            for job_id, status in zip(members, statuses, strict=True):
                if status is None:
                    missing.add(job_id)
                    if job_id not in self._missing:
                        continue
                if status not in (b"queued", b"in_progress"):
                    stale.append(job_id)
            if stale:
                await self.redis.srem(slots, *stale)
        self._missing = missing

    async def stop(self) -> None:
        await cancel_and_wait(self._runners.values())

    # -- one batch ----------------------------------------------------------------------

    async def _drive(self, batch_id: str) -> None:
        lock = Lock(self.redis, keys.batch_lock(batch_id), timeout=LOCK_SECONDS, blocking=False)
        if not await lock.acquire(token=self.owner):
            return  # another API process drives it
        try:
            await self._run(batch_id, lock)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: runner failed; it will be picked up again", batch_id)
        finally:
            with contextlib.suppress(Exception):
                await lock.release()

    async def _run(self, batch_id: str, lock: Lock) -> None:
        found = await read_batch(self.redis, batch_id)
        if found is None:
            return
        batch, counters = found
        path = self.files.path(batch.input_file_id)
        if batch.status == BatchStatus.validating:
            total, errors = await asyncio.to_thread(
                scan_input, path, self.settings.batch_max_lines, self.settings.batch_max_bytes, batch.endpoint
            )
            if errors:
                await set_fields(
                    self.redis,
                    batch_id,
                    status=BatchStatus.failed,
                    failed_at=int(time.time()),
                    errors=BatchErrors(data=errors),
                )
                await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)
                # Logs (issue 9): its input was refused; nothing ran.
                log_event(
                    log,
                    "batch.ended",
                    batch_id=batch_id,
                    key_id=batch.owner or None,
                    status=BatchStatus.failed,
                    errors=len(errors),
                    first_error=errors[0].code if errors else None,
                )
                return
            await self.redis.hset(keys.batch(batch_id), "n_total", total)
            await set_fields(self.redis, batch_id, status=BatchStatus.in_progress, in_progress_at=int(time.time()))
            batch, counters = (await read_batch(self.redis, batch_id)) or (batch, counters)
        lines = _Lines(path, counters["dispatched"])
        wakeup = self._wakeups.setdefault(batch_id, asyncio.Event())
        stopped_at: float | None = None
        while True:
            wakeup.clear()
            try:
                await lock.reacquire()
            except LockError:
                log.warning("batch %s: lost its lock; leaving it to the process that holds it", batch_id)
                return
            found = await read_batch(self.redis, batch_id)
            if found is None:
                return
            batch, counters = found
            ended = counters["completed"] + counters["failed"] + counters["cancelled"]
            stopping = batch.status == BatchStatus.cancelling or (
                batch.expires_at is not None and time.time() > batch.expires_at
            )
            if stopping:
                if stopped_at is None or time.monotonic() - stopped_at > RESTOP_SECONDS:
                    await self._stop_lines(batch, counters)
                    stopped_at = time.monotonic()
                if ended >= counters["dispatched"]:
                    final = BatchStatus.cancelled if batch.status == BatchStatus.cancelling else BatchStatus.expired
                    await self._finalize(batch_id, final)
                    return
            elif batch.status == BatchStatus.finalizing or (lines.done and ended >= counters["total"]):
                await self._finalize(batch_id, BatchStatus.completed)
                return
            elif not lines.done:
                if await self._dispatch(batch, lines):
                    continue  # handed some out: look again at once
            # Nothing to do until a line ends, a slot frees up or a client acts.
            timeout = LOCK_SECONDS / 3
            if batch.expires_at is not None and not stopping:
                # Woken when its window ends, too (not only when a line ends).
                timeout = min(timeout, max(0.0, batch.expires_at - time.time()) + 0.01)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=timeout)
            # Lines end one at a time: a moment's wait gathers the slots freed meanwhile
            # into one turn (one group), instead of a turn of round trips per line.
            await asyncio.sleep(COALESCE_SECONDS)

    async def _capacity(self, model: str) -> int:
        """The model's batch slots: `BATCH_SLOT_SHARE` of its live workers' (read at most
        once every CAPACITY_SECONDS)."""
        return (await self._model_slots(model))[0]

    async def _model_slots(self, model: str) -> tuple[int, int]:
        """The model's batch slots (`_capacity`), and how many lines go in one message: a
        quarter of the smallest live worker's batch slots, rounded up (at most
        MESSAGE_LINES), so a turn's lines still spread over the workers."""
        cached = self._capacities.get(model)
        if cached is not None and time.monotonic() - cached[0] < CAPACITY_SECONDS:
            return cached[1], cached[2]
        workers = await live_workers(self.redis, self.settings.worker_ttl_seconds)
        share = self.settings.batch_slot_share
        each = [max(1, int(w.slots * share)) for w in workers if w.model == model]
        capacity = sum(each)
        per_message = max(1, min(MESSAGE_LINES, -(-min(each, default=1) // 4)))
        self._capacities[model] = (time.monotonic(), capacity, per_message)
        return capacity, per_message

    async def _dispatch(self, batch: BatchObject, lines: _Lines) -> bool:
        """Hand out the prepared lines that find a slot, then prepare the next ones (read,
        validated, tokenized) while those run; True if any went out. Lines are prepared up
        to a capacity's worth ahead of the free slots, so a turn woken by lines ending
        hands out lines already made, not lines it must first tokenize (issue 12)."""
        sent = await self._send_held(batch, lines)
        if await self._prepare_more(batch, lines) and not sent:
            sent = await self._send_held(batch, lines)
        return sent

    async def _prepare_more(self, batch: BatchObject, lines: _Lines) -> bool:
        """Read and prepare lines up to a capacity's worth beyond the free slots (at most
        GROUP held); True if any were."""
        if lines.eof:
            return False
        if lines.model is None:
            want = FIRST_GROUP
        else:
            capacity = await self._capacity(lines.model)
            used = await self.redis.scard(keys.batch_slots(lines.model))
            want = 2 * capacity - used - len(lines.held)
        want = min(want, GROUP - len(lines.held))
        if want <= 0:
            return False
        items = await lines.read(want)
        # The live models once for the group (its lines then find them cached, not
        # each asking Redis when the cache has just lapsed).
        with contextlib.suppress(Exception):
            await self.chat.catalog.live_models()
        lines.held += await asyncio.gather(*(self._prepare(batch, i, line) for i, line in items))
        return bool(items)

    async def _send_held(self, batch: BatchObject, lines: _Lines) -> bool:
        """Hand out the longest head of the prepared lines whose valid lines all hold a
        slot; True if any went out."""
        group = lines.held
        if not group:
            return False
        # Slots for the group's valid lines, in order, per model (most batches name one).
        wanted: dict[str, list[str]] = defaultdict(list)
        for item in group:
            if item.error is None:
                wanted[item.record.model].append(item.record.id)
                lines.model = item.record.model
        granted: dict[str, int] = {}
        for model, ids in wanted.items():
            granted[model] = int(
                await self._reserve(
                    keys=[keys.batch_slots(model), keys.BATCH_SLOT_SETS], args=[await self._capacity(model), *ids]
                )
            )
        # The group's longest head whose valid lines all hold a slot goes out.
        taken: dict[str, int] = defaultdict(int)
        count = 0
        for item in group:
            if item.error is None:
                model = item.record.model
                if taken[model] >= granted[model]:
                    break
                taken[model] += 1
            count += 1
        if count == 0:
            return False
        handed, lines.held = group[:count], group[count:]
        await self._hand_out(batch, handed)
        return True

    async def _prepare(self, batch: BatchObject, index: int, line: InputLine) -> _Line:
        """The line's job record, or its failed record when the line is invalid."""
        job_id = line_job_id(batch.id, batch.endpoint, index)
        try:
            if batch.endpoint == "/v1/completions" and self.completions is not None:
                completion = CompletionRequest.model_validate({**line.body, "stream": False})
                record = await self.completions.prepare(completion, job_id=job_id)
            elif batch.endpoint == "/v1/responses" and self.responses is not None:
                body = {**line.body, "stream": False, "background": False}
                record = await self.responses.prepare(
                    ResponsesRequest.model_validate(body), job_id=job_id, owner=batch.owner
                )
            else:
                chat = ChatCompletionRequest.model_validate({**line.body, "stream": False})
                record = await self.chat.prepare(chat, job_id=job_id)
        except (ValidationError, ServiceError) as exc:
            error = _validation_error(exc) if isinstance(exc, ValidationError) else exc
            failed = JobRecord(id=job_id, model=str(line.body.get("model", "")), status=JobStatus.failed)
            failed.error = error.to_dict()["error"] | {"status_code": error.status_code}
            failed.finished = time.time()
            self._line(failed, batch, line)
            return _Line(index, failed, error)
        self._line(record, batch, line)
        if record.deadline is None:
            record.deadline = record.created + self.settings.queue_timeout_seconds
        return _Line(index, record)

    async def _hand_out(self, batch: BatchObject, group: list[_Line]) -> None:
        """Write the group's records (one round trip), send the messages of its queued
        lines (one pipeline per model), then move the high-water mark past it. Safe to
        repeat after a crash at any point: a record that exists is left as it is, and
        its message is sent again only while it is queued."""
        # Before any record is written: a stop that finds this group half handed out (the
        # process died, or a send failed) cancels what it left (`_stop_lines`).
        await self._raise_handing(keys=[keys.batch(batch.id)], args=[group[-1].index + 1])
        codes = await self.pipeline.store.create_lines([item.record for item in group], ttl=self._ttl())
        again = [item for item, code in zip(group, codes, strict=True) if code != 1]
        statuses: list[Any] = []
        if again:
            # Handed out before a restart: queued ones get their message again; one that
            # has ended meanwhile holds no slot, and counts as ended with its own status
            # (whatever this preparation made of it: the record written first stands).
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in again:
                    pipe.hget(keys.job(item.record.id), "status")
                statuses = await pipe.execute()
        resend = {
            item.record.id for item, st in zip(again, statuses, strict=True) if st == b"queued" and item.error is None
        }
        to_send: dict[str, list[str]] = defaultdict(list)
        for item, code in zip(group, codes, strict=True):
            if item.error is None and (code == 1 or item.record.id in resend):
                to_send[item.record.model].append(item.record.id)
        for model, ids in to_send.items():
            per_message = (await self._model_slots(model))[1]
            groups = [ids[i : i + per_message] for i in range(0, len(ids), per_message)]
            await self.pipeline.queue.submit_groups(groups, model, keys.BATCH_PRIORITY)
        async with self.redis.pipeline(transaction=False) as pipe:
            for item, st in zip(again, statuses, strict=True):
                if st is not None and (status := JobStatus(keys.text(st))).terminal:
                    pipe.srem(keys.batch_slots(item.record.model), item.record.id)
                    pipe.sadd(keys.batch_ended(batch.id, status.value), item.record.id)
            failed = [item.record.id for item, code in zip(group, codes, strict=True) if item.error and code == 1]
            if failed:
                pipe.sadd(keys.batch_ended(batch.id, JobStatus.failed.value), *failed)
            # A high-water mark (set, not incremented): writing it twice is harmless.
            pipe.hset(keys.batch(batch.id), "n_dispatched", group[-1].index + 1)
            await pipe.execute()
        for item, code in zip(group, codes, strict=True):
            if code == 1:
                self._log_line(item)

    @staticmethod
    def _log_line(item: _Line) -> None:
        record, error = item.record, item.error
        if error is not None:
            # Logs (issue 9): an invalid line's job ends before it was ever queued.
            log_event(
                log,
                "job.ended",
                **job_fields(record),
                status=JobStatus.failed,
                attempt=0,
                error_code=error.code,
                param=error.param,
                status_code=error.status_code,
                by="batch",
            )
            return
        # Logs (issue 9): the line's first line, as `JobPipeline.enqueue` writes it.
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
        )

    def _line(self, record: JobRecord, batch: BatchObject, line: InputLine) -> None:
        record.batch, record.custom_id, record.owner = batch.id, line.custom_id, batch.owner
        record.options.background = True
        # A line waits for a slot, not for the queue: it may start any time before the batch expires.
        record.deadline = float(batch.expires_at) if batch.expires_at else None

    def _ttl(self) -> int:
        # A batch's records outlive its window, so results can be written at the end.
        return max(self.settings.job_ttl_seconds, 2 * 24 * 3600)

    async def _stop_lines(self, batch: BatchObject, counters: dict[str, int]) -> None:
        """Cancel the lines handed out that have not ended; the rest are never handed out.
        A group half handed out (records written, `n_dispatched` not yet past them: the
        process died, or a send failed) counts as handed out up to its last line with a
        record, so those lines are cancelled and waited for too (`counters` is updated)."""
        dispatched = counters["dispatched"]
        handing = counters.get("handing", 0)
        if handing > dispatched:
            ids = [line_job_id(batch.id, batch.endpoint, i) for i in range(dispatched, handing)]
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(keys.job(job_id), "status")
                statuses = await pipe.execute()
            written = [i for i, st in enumerate(statuses) if st is not None]
            if written:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for i in written:
                        status = JobStatus(keys.text(statuses[i]))
                        if status.terminal:
                            pipe.sadd(keys.batch_ended(batch.id, status.value), ids[i])
                    dispatched = dispatched + written[-1] + 1
                    pipe.hset(keys.batch(batch.id), "n_dispatched", dispatched)
                    await pipe.execute()
                counters["dispatched"] = dispatched
        for start in range(0, dispatched, STATUS_CHUNK):
            ids = [
                line_job_id(batch.id, batch.endpoint, i) for i in range(start, min(start + STATUS_CHUNK, dispatched))
            ]
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(keys.job(job_id), "status")
                statuses = await pipe.execute()
            for job_id, status in zip(ids, statuses, strict=True):
                if status in (b"queued", b"in_progress"):
                    await self.pipeline.cancel(job_id, quiet=True, source="batch")

    async def _finalize(self, batch_id: str, final: BatchStatus) -> None:
        """Write the output and error files and end the batch. Safe to repeat after a
        crash: the files are written anew and only the last set is recorded."""
        if final == BatchStatus.completed:
            await set_fields(self.redis, batch_id, status=BatchStatus.finalizing, finalizing_at=int(time.time()))
        found = await read_batch(self.redis, batch_id)
        if found is None:
            return
        batch, _ = found
        out_path, err_path, completed, failed = await write_results(self.redis, self.files, batch)
        fields: dict[str, Any] = {"status": final}
        if completed:
            fields["output_file_id"] = (
                await self.files.adopt(out_path, f"{batch_id}_output.jsonl", "batch_output", batch.owner)
            ).id
        else:
            out_path.unlink(missing_ok=True)
        if failed:
            fields["error_file_id"] = (
                await self.files.adopt(err_path, f"{batch_id}_error.jsonl", "batch_output", batch.owner)
            ).id
        else:
            err_path.unlink(missing_ok=True)
        fields[{"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final.value]] = int(
            time.time()
        )
        # The final counts (lines never run count as failed), kept in the record from now on.
        await self.redis.hset(keys.batch(batch_id), mapping={"n_completed": completed, "n_failed": failed})
        await set_fields(self.redis, batch_id, **fields)
        await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)
        # Logs (issue 9): the batch's end, with its final counts.
        log_event(
            log,
            "batch.ended",
            batch_id=batch_id,
            key_id=batch.owner or None,
            status=final,
            total=batch.request_counts.total,
            completed=completed,
            failed=failed,
            duration_s=time.time() - batch.created_at,
        )
