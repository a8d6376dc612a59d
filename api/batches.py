"""The Batch API: BatchService (create, read, list, cancel) and the BatchRunner that
drives each batch through validating -> in_progress -> finalizing -> completed.

Lines run as ordinary jobs on the model workers, queued at a lower broker priority, and
handed out only while the model's batch work in flight stays below a share of the live
workers' slots (`BATCH_SLOT_SHARE`): interactive chat always finds a free slot. A batch's
state lives in Redis (record, counters, deterministic job ids per line), so any API
process can pick it up after a restart; a lock lets one drive it at a time. Output and
error files are written once, at the end, from the job records, in input order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, ValidationError

from api.chat import ChatService, completion_object
from api.files import FileStore
from common import keys
from common.batches import BatchError, BatchErrors, BatchObject, BatchStatus, batch_from_redis, batch_to_redis
from common.errors import InvalidRequestError, NotFoundError, ServiceError
from common.job_queue import JobQueue
from common.jobs import JobRecord, JobStatus
from common.jobstore import JobStore
from common.schemas import ChatCompletionRequest
from common.settings import Settings

log = logging.getLogger(__name__)
ENDPOINT = "/v1/chat/completions"
WINDOW_SECONDS = {"24h": 24 * 3600}
LOCK_SECONDS = 30


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None)


class BatchNotFoundError(NotFoundError):
    default_code = "batch_not_found"


class BatchConflictError(ServiceError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "batch_not_cancellable"


class InputLine(BaseModel):
    custom_id: str = Field(min_length=1)
    method: str
    url: str
    body: dict[str, Any]


def scan_input(path: Path, max_lines: int, max_bytes: int) -> tuple[int, list[BatchError]]:
    """Check a batch input file as a whole: size, JSONL, line shape, unique custom_ids.
    Returns (line count, errors)."""
    size = path.stat().st_size
    if size > max_bytes:
        return 0, [BatchError(code="file_too_large", message=f"the input file is {size} bytes; at most {max_bytes}")]
    errors: list[BatchError] = []
    seen: set[str] = set()
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            if count > max_lines:
                errors.append(
                    BatchError(code="too_many_lines", message=f"the input has more than {max_lines} lines", line=number)
                )
                break
            try:
                line = InputLine.model_validate_json(raw)
            except ValidationError as exc:
                kind = "invalid_json_line" if exc.errors()[0]["type"] == "json_invalid" else "invalid_request"
                errors.append(BatchError(code=kind, message=f"line {number}: {exc.errors()[0]['msg']}", line=number))
            else:
                if line.method != "POST":
                    errors.append(BatchError(code="invalid_method", message="method must be POST", line=number))
                if line.url != ENDPOINT:
                    errors.append(BatchError(code="invalid_url", message=f"url must be {ENDPOINT}", line=number))
                if line.custom_id in seen:
                    errors.append(
                        BatchError(
                            code="duplicate_custom_id", message=f"duplicate custom_id {line.custom_id!r}", line=number
                        )
                    )
                seen.add(line.custom_id)
            if len(errors) >= 100:
                break
    if count == 0 and not errors:
        errors.append(BatchError(code="empty_file", message="the input file has no requests"))
    return count, errors


def iter_lines(path: Path, start: int = 0) -> Iterator[tuple[int, InputLine]]:
    """(index, line) of the request lines from `start` on (blank lines do not count)."""
    index = -1
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            index += 1
            if index >= start:
                yield index, InputLine.model_validate_json(raw)


class BatchService:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        files: FileStore,
        chat: ChatService,
        queue: JobQueue,
    ):
        self.settings = settings
        self.redis = redis
        self.files = files
        self.chat = chat
        self.queue = queue
        self.store = JobStore(redis, max(settings.job_ttl_seconds, 2 * max(WINDOW_SECONDS.values())))
        self._runners: dict[str, asyncio.Task[None]] = {}
        self.owner = uuid.uuid4().hex

    # -- API ----------------------------------------------------------------------------

    async def create(self, body: BatchCreate) -> BatchObject:
        if body.endpoint != ENDPOINT:
            raise InvalidRequestError(f"endpoint must be {ENDPOINT}", param="endpoint")
        if body.completion_window not in WINDOW_SECONDS:
            raise InvalidRequestError("completion_window must be 24h", param="completion_window")
        if body.metadata is not None and len(body.metadata) > 16:
            raise InvalidRequestError("metadata may have at most 16 keys", param="metadata")
        source = await self.files.get(body.input_file_id)
        if source.purpose != "batch":
            raise InvalidRequestError("the input file's purpose must be 'batch'", param="input_file_id")
        now = int(time.time())
        batch = BatchObject(
            id=f"batch_{uuid.uuid4().hex}",
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            status=BatchStatus.validating,
            created_at=now,
            expires_at=now + WINDOW_SECONDS[body.completion_window],
            metadata=body.metadata,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch.id), mapping=batch_to_redis(batch))  # type: ignore[arg-type]
            pipe.zadd(keys.BATCHES, {batch.id: time.time()})
            pipe.sadd(keys.ACTIVE_BATCHES, batch.id)
            await pipe.execute()
        self._start(batch.id)
        return batch

    async def get(self, batch_id: str) -> BatchObject:
        raw = await self.redis.hgetall(keys.batch(batch_id))
        if not raw:
            raise BatchNotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch_from_redis(raw)[0]

    async def list_batches(self, after: str | None, limit: int) -> list[BatchObject]:
        ids = [keys.text(i) for i in await self.redis.zrange(keys.BATCHES, 0, -1, desc=True)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        return [await self.get(i) for i in ids[:limit]]

    async def cancel(self, batch_id: str) -> BatchObject:
        batch = await self.get(batch_id)
        if batch.status in (BatchStatus.cancelling, BatchStatus.cancelled):
            return batch
        if batch.status.terminal:
            raise BatchConflictError(f"Batch '{batch_id}' has already ended ({batch.status.value}).")
        await self._set(batch_id, status=BatchStatus.cancelling, cancelling_at=int(time.time()))
        self._start(batch_id)
        return await self.get(batch_id)

    # -- running ------------------------------------------------------------------------

    async def supervise(self, interval: float = 5.0) -> None:
        """Drive every unfinished batch, including those a stopped API process left."""
        while True:
            try:
                for raw in await self.redis.smembers(keys.ACTIVE_BATCHES):
                    batch_id = keys.text(raw)
                    status = await self.redis.hget(keys.batch(batch_id), "status")
                    if status is None or BatchStatus(keys.text(status)).terminal:
                        await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)
                    else:
                        self._start(batch_id)
            except Exception as exc:
                log.warning("batch supervisor: %s", exc)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        for task in self._runners.values():
            task.cancel()
        await asyncio.gather(*self._runners.values(), return_exceptions=True)

    def _start(self, batch_id: str) -> None:
        task = self._runners.get(batch_id)
        if task is None or task.done():
            self._runners[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch-{batch_id}")

    async def _drive(self, batch_id: str) -> None:
        lock = keys.batch_lock(batch_id)
        if not await self.redis.set(lock, self.owner, nx=True, ex=LOCK_SECONDS):
            if keys.text(await self.redis.get(lock) or b"") != self.owner:
                return  # another API process drives it
        try:
            await self._run(batch_id, lock)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: runner failed; it will be picked up again", batch_id)
        finally:
            with contextlib.suppress(Exception):
                if keys.text(await self.redis.get(lock) or b"") == self.owner:
                    await self.redis.delete(lock)

    async def _run(self, batch_id: str, lock: str) -> None:
        batch, counters = batch_from_redis(await self.redis.hgetall(keys.batch(batch_id)))
        path = self.files.path(batch.input_file_id)
        if batch.status == BatchStatus.validating:
            total, errors = await asyncio.to_thread(
                scan_input, path, self.settings.batch_max_lines, self.settings.batch_max_bytes
            )
            if errors:
                await self._set(
                    batch_id, status=BatchStatus.failed, failed_at=int(time.time()), errors=BatchErrors(data=errors)
                )
                await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)
                return
            await self.redis.hset(keys.batch(batch_id), "n_total", total)
            await self._set(batch_id, status=BatchStatus.in_progress, in_progress_at=int(time.time()))
            batch, counters = batch_from_redis(await self.redis.hgetall(keys.batch(batch_id)))
        lines = iter_lines(path, counters["dispatched"])
        pending = True
        while True:
            await self.redis.expire(lock, LOCK_SECONDS)
            batch, counters = batch_from_redis(await self.redis.hgetall(keys.batch(batch_id)))
            ended = counters["completed"] + counters["failed"] + counters["cancelled"]
            stopping = batch.status == BatchStatus.cancelling or (
                batch.expires_at is not None and time.time() > batch.expires_at
            )
            if stopping:
                await self._stop_lines(batch_id, counters)
                if ended >= counters["dispatched"]:
                    final = BatchStatus.cancelled if batch.status == BatchStatus.cancelling else BatchStatus.expired
                    await self._finalize(batch_id, final)
                    return
            elif batch.status == BatchStatus.finalizing or (not pending and ended >= counters["total"]):
                await self._finalize(batch_id, BatchStatus.completed)
                return
            elif pending:
                room = await self._room()
                if room > 0:
                    pending = await self._dispatch(batch_id, lines, room)
                    continue
                # Lines are waiting for room: look again soon (slots free up continuously).
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(0.5)

    async def _room(self) -> int:
        """How many more lines the live workers can take: their batch share of slots,
        minus the batch work of every running batch already in flight."""
        workers = await self.chat.catalog.live_workers()
        capacity = sum(max(1, int(w.slots * self.settings.batch_slot_share)) for w in workers)
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw in await self.redis.smembers(keys.ACTIVE_BATCHES):
                pipe.hgetall(keys.batch(keys.text(raw)))
            batches = await pipe.execute()
        in_flight = 0
        for data in batches:
            if not data:
                continue
            other, c = batch_from_redis(data)
            if other.status in (BatchStatus.in_progress, BatchStatus.cancelling):
                in_flight += c["dispatched"] - c["completed"] - c["failed"] - c["cancelled"]
        return capacity - in_flight

    async def _dispatch(self, batch_id: str, lines: Iterator[tuple[int, InputLine]], room: int) -> bool:
        """Hand out up to `room` lines; False once none are left."""
        for _ in range(room):
            item = next(lines, None)
            if item is None:
                return False
            index, line = item
            job_id = keys.batch_job_id(batch_id, index)
            try:
                req = ChatCompletionRequest.model_validate({**line.body, "stream": False})
                record = await self.chat.prepare(req, job_id=job_id)
            except (ValidationError, ServiceError) as exc:
                error = (
                    InvalidRequestError(str(exc.errors()[0]["msg"]), param=".".join(map(str, exc.errors()[0]["loc"])))
                    if isinstance(exc, ValidationError)
                    else exc
                )
                record = JobRecord(id=job_id, model=str(line.body.get("model", "")), status=JobStatus.failed)
                record.error = error.to_dict()["error"] | {"status_code": error.status_code}
                record.finished = time.time()
                await self._record(record, batch_id, line.custom_id)
                await self.redis.hincrby(keys.batch(batch_id), "n_failed", 1)
            else:
                await self._record(record, batch_id, line.custom_id)
                await self.queue.submit(job_id, record.model, priority=keys.BATCH_PRIORITY)
            await self.redis.hincrby(keys.batch(batch_id), "n_dispatched", 1)
        return True

    async def _record(self, record: JobRecord, batch_id: str, custom_id: str) -> None:
        record.batch, record.custom_id = batch_id, custom_id
        record.options.background = True
        key = keys.job(record.id)
        if await self.redis.exists(key):
            return  # dispatched before a restart: keep what it has
        await self.store.create(record)

    async def _stop_lines(self, batch_id: str, counters: dict[str, int]) -> None:
        """Cancel the lines handed out that have not ended; the rest are never handed out."""
        for index in range(counters["dispatched"]):
            job_id = keys.batch_job_id(batch_id, index)
            before = await self.store.cancel(job_id)
            if before == "queued":
                await self.redis.hincrby(keys.batch(batch_id), "n_cancelled", 1)
            elif before == "in_progress":
                await self.redis.publish(keys.CANCEL_CHANNEL, job_id)

    async def _finalize(self, batch_id: str, final: BatchStatus) -> None:
        """Write the output and error files and end the batch. Safe to repeat after a
        crash: the files are written anew and only the last set is recorded."""
        if final == BatchStatus.completed:
            await self._set(batch_id, status=BatchStatus.finalizing, finalizing_at=int(time.time()))
        batch, counters = batch_from_redis(await self.redis.hgetall(keys.batch(batch_id)))
        out_path, err_path, completed, failed = await self._write_results(batch)
        fields: dict[str, Any] = {"status": final}
        if completed:
            fields["output_file_id"] = (await self.files.adopt(out_path, f"{batch_id}_output.jsonl", "batch_output")).id
        else:
            out_path.unlink(missing_ok=True)
        if failed:
            fields["error_file_id"] = (await self.files.adopt(err_path, f"{batch_id}_error.jsonl", "batch_output")).id
        else:
            err_path.unlink(missing_ok=True)
        fields[{"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final.value]] = int(
            time.time()
        )
        await self.redis.hset(keys.batch(batch_id), mapping={"n_completed": completed, "n_failed": failed})
        await self._set(batch_id, **fields)
        await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)

    async def _write_results(self, batch: BatchObject) -> tuple[Path, Path, int, int]:
        """Output and error files from the job records, in input order."""
        folder = self.files.folder
        out = Path(tempfile.mkstemp(dir=folder, prefix=".out-")[1])
        err = Path(tempfile.mkstemp(dir=folder, prefix=".err-")[1])
        completed = failed = 0
        path = self.files.path(batch.input_file_id)
        with open(out, "w") as out_f, open(err, "w") as err_f:
            chunk: list[tuple[int, InputLine]] = []
            for item in iter_lines(path):
                chunk.append(item)
                if len(chunk) == 200:
                    c, f = await self._write_chunk(batch, chunk, out_f, err_f)
                    completed, failed, chunk = completed + c, failed + f, []
            if chunk:
                c, f = await self._write_chunk(batch, chunk, out_f, err_f)
                completed, failed = completed + c, failed + f
        return out, err, completed, failed

    async def _write_chunk(
        self, batch: BatchObject, chunk: list[tuple[int, InputLine]], out_f: Any, err_f: Any
    ) -> tuple[int, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for index, _ in chunk:
                pipe.hgetall(keys.job(keys.batch_job_id(batch.id, index)))
            raws = await pipe.execute()
        completed = failed = 0
        for (index, line), raw in zip(chunk, raws, strict=True):
            request_id = keys.batch_job_id(batch.id, index)
            entry: dict[str, Any] = {
                "id": f"batch_req_{request_id.removeprefix('chatcmpl-')}",
                "custom_id": line.custom_id,
            }
            record = JobRecord.from_redis(raw) if raw else None
            if record is not None and record.status == JobStatus.completed:
                body = completion_object(record)
                entry |= {"response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
                out_f.write(json.dumps(entry) + "\n")
                completed += 1
                continue
            if record is not None and record.status == JobStatus.failed and record.error:
                status = int(record.error.get("status_code", 500))
                error = {k: v for k, v in record.error.items() if k != "status_code"}
                entry |= {
                    "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
                    "error": None,
                }
            else:
                code = (
                    "batch_expired"
                    if batch.status == BatchStatus.expired or (batch.expires_at or 0) < time.time()
                    else "batch_cancelled"
                )
                message = (
                    "the batch expired before this request ran"
                    if code == "batch_expired"
                    else "the batch was cancelled before this request ran"
                )
                entry |= {"response": None, "error": {"code": code, "message": message}}
            err_f.write(json.dumps(entry) + "\n")
            failed += 1
        return completed, failed

    async def _set(self, batch_id: str, **fields: Any) -> None:
        values: dict[str, str] = {}
        for name, value in fields.items():
            if isinstance(value, BaseModel):
                values[name] = value.model_dump_json()
            elif isinstance(value, BatchStatus):
                values[name] = value.value
            elif isinstance(value, str):
                values[name] = value
            else:
                values[name] = json.dumps(value)
        await self.redis.hset(keys.batch(batch_id), mapping=values)  # type: ignore[arg-type]
