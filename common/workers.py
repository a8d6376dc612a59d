"""Who is serving: the workers whose registration (refreshed by their heartbeat) is fresh."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from common import keys
from common.jobs import WorkerInfo


async def live_workers(redis: aioredis.Redis, worker_ttl_seconds: float) -> list[WorkerInfo]:
    ids = await redis.zrangebyscore(keys.WORKERS, time.time() - worker_ttl_seconds, "+inf")
    if not ids:
        return []
    infos = await redis.mget([keys.worker(keys.text(i)) for i in ids])
    return [WorkerInfo.model_validate_json(raw) for raw in infos if raw]
