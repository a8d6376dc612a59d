"""BatchService: the Batch API's objects (create, read, list, cancel). Running a batch is
the `BatchRunner`'s business; this only records what clients ask for and wakes it."""

from __future__ import annotations

import logging
import time
import uuid

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from api.auth import Principal
from api.batches.input import ENDPOINTS, WINDOW_SECONDS
from api.batches.records import read_batch, set_fields
from api.batches.runner import BatchRunner
from api.files import FileStore
from common import keys
from common.batches import BatchObject, BatchStatus, batch_to_redis
from common.errors import ConflictError, InvalidRequestError, NotFoundError
from common.logs import log_event

log = logging.getLogger(__name__)


class BatchCreate(BaseModel):
    # The documented schema says what `BatchService.create` accepts (its checks stay there).
    input_file_id: str
    endpoint: str = Field(json_schema_extra={"enum": list(ENDPOINTS)})
    completion_window: str = Field(json_schema_extra={"enum": [w for w in sorted(WINDOW_SECONDS)]})
    metadata: dict[str, str] | None = Field(default=None, json_schema_extra={"maxProperties": 16})


class BatchNotFoundError(NotFoundError):
    default_code = "batch_not_found"


class BatchConflictError(ConflictError):
    default_code = "batch_not_cancellable"


class BatchService:
    def __init__(self, redis: aioredis.Redis, files: FileStore, runner: BatchRunner):
        self.redis = redis
        self.files = files
        self.runner = runner

    async def create(self, body: BatchCreate, caller: Principal) -> BatchObject:
        if body.endpoint not in ENDPOINTS:
            raise InvalidRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if body.completion_window not in WINDOW_SECONDS:
            raise InvalidRequestError("completion_window must be 24h", param="completion_window")
        if body.metadata is not None and len(body.metadata) > 16:
            raise InvalidRequestError("metadata may have at most 16 keys", param="metadata")
        source = await self.files.get(body.input_file_id, caller)
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
        ).owned_by(caller.key_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch.id), mapping=batch_to_redis(batch))  # type: ignore[arg-type]
            pipe.zadd(keys.BATCHES, {batch.id: time.time()})
            pipe.zadd(keys.owned_batches(caller.key_id), {batch.id: time.time()})
            pipe.sadd(keys.ACTIVE_BATCHES, batch.id)
            await pipe.execute()
        self.runner.start(batch.id)
        # Logs (issue 9): the batch's first line; its lines' jobs name it as batch_id.
        log_event(
            log,
            "batch.created",
            batch_id=batch.id,
            key_id=caller.key_id or None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
        )
        return batch

    async def get(self, batch_id: str, caller: Principal) -> BatchObject:
        found = await read_batch(self.redis, batch_id)
        if found is None or not caller.owns(found[0].owner):
            raise BatchNotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")
        return found[0]

    async def list_batches(self, caller: Principal, after: str | None, limit: int) -> list[BatchObject]:
        index = keys.BATCHES if caller.admin else keys.owned_batches(caller.key_id)
        ids = [keys.text(i) for i in await self.redis.zrange(index, 0, -1, desc=True)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        return [await self.get(i, caller) for i in ids[:limit]]

    async def cancel(self, batch_id: str, caller: Principal) -> BatchObject:
        batch = await self.get(batch_id, caller)
        if batch.status in (BatchStatus.cancelling, BatchStatus.cancelled):
            return batch
        if batch.status.terminal:
            raise BatchConflictError(f"Batch '{batch_id}' has already ended ({batch.status.value}).")
        await set_fields(self.redis, batch_id, status=BatchStatus.cancelling, cancelling_at=int(time.time()))
        log_event(
            log, "batch.cancel_requested", batch_id=batch_id, key_id=batch.owner or None, by=caller.key_id or None
        )
        self.runner.start(batch_id)
        self.runner.wake(batch_id)
        return await self.get(batch_id, caller)
