"""A batch's output and error files, written once at the end from the job records, in
input order (CHUNK records read per Redis round trip)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from api.batches.input import InputLine, iter_lines, line_job_id
from api.endpoints.chat import completion_object
from api.endpoints.responses import result_object
from api.files import FileStore
from common import keys
from common.batches import BatchObject, BatchStatus
from common.jobs import JobRecord, JobStatus

# A line's output object comes from these fields of its job record (not its request,
# the biggest: the prompt's token ids), by the batch's endpoint; Responses read it all.
RESULT_FIELDS = ("id", "model", "status", "created", "finished", "usage", "result", "error")
CHUNK = 500
KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


async def write_results(redis: aioredis.Redis, files: FileStore, batch: BatchObject) -> tuple[Path, Path, int, int]:
    """(output path, error path, lines completed, lines failed)."""
    folder = files.folder
    out = Path(tempfile.mkstemp(dir=folder, prefix=".out-")[1])
    err = Path(tempfile.mkstemp(dir=folder, prefix=".err-")[1])
    completed = failed = 0
    path = files.path(batch.input_file_id)
    with open(out, "w") as out_f, open(err, "w") as err_f:
        chunk: list[tuple[int, InputLine]] = []
        for item in iter_lines(path):
            chunk.append(item)
            if len(chunk) == CHUNK:
                c, f = await _write_chunk(redis, batch, chunk, out_f, err_f)
                completed, failed, chunk = completed + c, failed + f, []
        if chunk:
            c, f = await _write_chunk(redis, batch, chunk, out_f, err_f)
            completed, failed = completed + c, failed + f
    return out, err, completed, failed


async def _write_chunk(
    redis: aioredis.Redis, batch: BatchObject, chunk: list[tuple[int, InputLine]], out_f: Any, err_f: Any
) -> tuple[int, int]:
    responses = batch.endpoint == "/v1/responses"
    kind = KINDS.get(batch.endpoint)
    async with redis.pipeline(transaction=False) as pipe:
        for index, _ in chunk:
            job_key = keys.job(line_job_id(batch.id, batch.endpoint, index))
            if kind is None:
                pipe.hgetall(job_key)
            else:
                pipe.hmget(job_key, RESULT_FIELDS)
        raws = await pipe.execute()
    completed = failed = 0
    for (index, line), raw in zip(chunk, raws, strict=True):
        request_id = line_job_id(batch.id, batch.endpoint, index)
        entry: dict[str, Any] = {
            "id": f"batch_req_{request_id.removeprefix('chatcmpl-').removeprefix('cmpl-').removeprefix('resp_')}",
            "custom_id": line.custom_id,
        }
        if kind is not None and raw[0] is not None:
            raw = {name: value for name, value in zip(RESULT_FIELDS, raw, strict=True) if value is not None}
        record = JobRecord.from_redis(raw) if raw and isinstance(raw, dict) else None
        if responses and record is not None and record.response is None and record.request is not None:
            # Its response was deleted (DELETE /v1/responses/{id}): nothing of it is kept.
            entry |= {"response": None, "error": {"code": "response_deleted", "message": "the response was deleted"}}
            err_f.write(json.dumps(entry) + "\n")
            failed += 1
            continue
        if record is not None and record.status == JobStatus.completed:
            body = result_object(record) if responses else completion_object(record, kind)
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
