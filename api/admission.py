"""Admission control: the limits a new interactive job must pass, and what a refused
client is told. Nothing is written for a refused request, and batch lines are never
refused here (they wait for free slots instead; see `api.batches.runner`).

- Requests per minute per key (`REQUESTS_PER_MINUTE_PER_KEY`): a fixed one-minute window
  counted in Redis, shared by every API process; every chat response carries the
  `x-ratelimit-*-requests` headers when the limit is on.
- Jobs waiting per model (`MAX_QUEUED_JOBS`, by default four times the live workers'
  slots) and jobs queued or running per key (`MAX_CONCURRENT_JOBS_PER_KEY`): checked
  and counted by the same Redis script that stores the job (`JobStore.create`), from the
  real queue (the model's waiting set, which claims, cancels and ends keep exact).

A refusal is a 429 with `Retry-After`. For a full queue it is estimated from the recent
drain rate (jobs of the model started in the last minute, counted by the claim script):
how long until as many jobs have started as the queue is over its limit, at most 120 s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from api.auth import Principal
from common import keys
from common.errors import OverloadedError, RateLimitError
from common.settings import Settings

MAX_RETRY_AFTER = 120
DRAIN_WINDOW_SECONDS = 60
# The default waiting-jobs limit: this many per live slot, and never fewer than the floor.
WAITING_PER_SLOT = 4
MIN_DEFAULT_WAITING = 64


class Admission:
    def __init__(self, settings: Settings, redis: aioredis.Redis, live_slots: Callable[[str], Awaitable[int]]):
        self.settings = settings
        self.redis = redis
        # The live workers' slots of a model, all together: the API's model catalog reads
        # them with the live models and keeps them fresh (no request waits for them).
        self._live_slots = live_slots

    async def count_request(self, principal: Principal) -> dict[str, str]:
        """Count a chat request against its key's per-minute limit: the `x-ratelimit-*`
        headers to send, or a `RateLimitError` carrying them."""
        limit = self.settings.requests_per_minute_per_key
        if not limit:
            return {}
        now = time.time()
        key = keys.requests_window(principal.key_id, int(now // 60))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            used, _ = await pipe.execute()
        reset = max(1, math.ceil(60 - now % 60))
        headers = {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - int(used))),
            "x-ratelimit-reset-requests": f"{reset}s",
        }
        if int(used) > limit:
            raise RateLimitError(
                f"Rate limit reached for requests per minute (RPM): limit {limit}. Please try again in {reset}s.",
                headers={**headers, "retry-after": str(reset)},
            )
        return headers

    async def queue_limit(self, model: str) -> int:
        """How many interactive jobs `model` may have waiting."""
        if self.settings.max_queued_jobs:
            return self.settings.max_queued_jobs
        return max(MIN_DEFAULT_WAITING, WAITING_PER_SLOT * await self._live_slots(model))

    async def drain_rate(self, model: str) -> float:
        """Jobs of `model` started per second over the last minute."""
        now = time.time()
        step = keys.STARTS_BUCKET_SECONDS
        buckets = [keys.started(model, now - i * step) for i in range(DRAIN_WINDOW_SECONDS // step + 1)]
        counts = await self.redis.mget(buckets)
        started = sum(int(c) for c in counts if c)
        return started / (DRAIN_WINDOW_SECONDS + now % step)

    async def retry_after(self, model: str, excess: int) -> int:
        """Seconds until `excess` more jobs of `model` have started, at the recent rate."""
        rate = await self.drain_rate(model)
        if rate <= 0:
            return MAX_RETRY_AFTER
        return min(MAX_RETRY_AFTER, max(1, math.ceil(excess / rate)))

    async def refusal(self, model: str, code: int, count: int, limit: int, headers: dict[str, str]) -> RateLimitError:
        """The error for a job `JobStore.create` refused (code -1: the model's queue is
        full, -2: the key has too many jobs)."""
        if code == -1:
            wait = await self.retry_after(model, count - limit + 1)
            return OverloadedError(
                f"The model '{model}' is overloaded: {count} requests are waiting (limit {limit}). "
                f"Please try again in {wait}s.",
                headers={**headers, "retry-after": str(wait)},
            )
        return RateLimitError(
            f"Rate limit reached for concurrent requests: limit {limit}, in use {count}. "
            "Please try again when one of your requests has finished.",
            headers={**headers, "retry-after": "1"},
        )
