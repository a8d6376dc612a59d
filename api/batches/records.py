"""Reading and writing a batch's record in Redis (shared by the service and the runner)."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from common import keys
from common.batches import ENDED, BatchObject, BatchStatus, batch_from_redis


async def read_batch(redis: aioredis.Redis, batch_id: str) -> tuple[BatchObject, dict[str, int]] | None:
    """A batch and its counters, in one round trip; None if unknown."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.batch(batch_id))
        for status in ENDED:
            pipe.scard(keys.batch_ended(batch_id, status))
        raw, *sizes = await pipe.execute()
    if not raw:
        return None
    return batch_from_redis(raw, dict(zip(ENDED, map(int, sizes), strict=True)))


async def set_fields(redis: aioredis.Redis, batch_id: str, **fields: Any) -> None:
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
    await redis.hset(keys.batch(batch_id), mapping=values)  # type: ignore[arg-type]
