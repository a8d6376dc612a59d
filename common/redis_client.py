"""The one way this service connects to Redis, with its retry policy chosen, not inherited.

redis-py retries a command after a connection error or timeout (its default: several
times, with back-off). A retried write may run twice when only its reply was lost, so
every write the service makes is idempotent: the job scripts in `common.jobstore` take
attempt numbers and claim tokens and answer the same when run again, batch progress is
kept in sets, not counters, and plain SET/HSET/SADD/ZADD repeat harmlessly. On that
basis the policy is: up to 3 retries, 50 ms doubling to 1 s with jitter, on connection
errors and timeouts only; after that the error reaches the caller (the API answers 503,
background loops wait and try again).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

RETRIES = 3


def retry_policy() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES, (ConnectionError, TimeoutError))


def connect(url: str, **kwargs: object) -> aioredis.Redis:
    """An asyncio Redis client for `url` with the service's retry policy."""
    kwargs.setdefault("health_check_interval", 10)
    return aioredis.from_url(url, retry=retry_policy(), **kwargs)  # type: ignore[arg-type]
