"""The one way this service connects to Redis, with its retry policy chosen, not inherited.

redis-py retries a command after a connection error or timeout (its default: several
times, with back-off). A retried write may run twice when only its reply was lost, so
every write the service makes is idempotent: the job scripts in `common.jobstore` take
attempt numbers and claim tokens and answer the same when run again, batch progress is
kept in sets, not counters, and plain SET/HSET/SADD/ZADD repeat harmlessly. On that
basis the policy is: up to 3 retries, 50 ms doubling to 1 s with jitter, on connection
errors and timeouts only; after that the error reaches the caller (the API answers 503,
background loops wait and try again).

The pool blocks: a command that finds all `REDIS_MAX_CONNECTIONS` connections busy waits
for one (up to `REDIS_POOL_TIMEOUT_SECONDS`) instead of failing with "Too many
connections" (redis-py's default pool: 100 connections, then errors; a burst of 300
streams got 187 503s from it with Redis healthy).
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

from common.settings import Settings, get_settings

RETRIES = 3


def retry_policy() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES, (ConnectionError, TimeoutError))


def tls_options(url: str, settings: Settings | None = None) -> dict[str, Any]:
    """redis-py's TLS arguments for `url`, from the REDIS_TLS_* settings: none unless it is
    `rediss://`. The same for asyncio and blocking clients, and for kombu (`broker_ssl`)."""
    if urlparse(url).scheme != "rediss":
        return {}
    s = settings or get_settings()
    options: dict[str, Any] = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if s.redis_tls_verify else ssl.CERT_NONE,
        "ssl_check_hostname": s.redis_tls_verify,
    }
    if s.redis_tls_ca_file:
        options["ssl_ca_certs"] = s.redis_tls_ca_file
    if s.redis_tls_cert_file:
        options["ssl_certfile"] = s.redis_tls_cert_file
    if s.redis_tls_key_file:
        options["ssl_keyfile"] = s.redis_tls_key_file
    return options


def broker_ssl(url: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` for `url` (kombu hands it to redis-py's SSLConnection).
    Every Celery app here sets it: given a `rediss://` URL without it, kombu connected
    without TLS through llmq's transport (it checks the scheme against its own transport's
    name only), and with its own transport without verifying the certificate."""
    return tls_options(url, settings) or None


def connect(url: str, max_connections: int = 256, pool_timeout: float = 20.0, **kwargs: object) -> aioredis.Redis:
    """An asyncio Redis client for `url` with the service's retry policy and a blocking pool
    (and TLS as configured, for a `rediss://` URL)."""
    kwargs.setdefault("health_check_interval", 10)
    for name, value in tls_options(url).items():
        kwargs.setdefault(name, value)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, retry=retry_policy(), **kwargs
    )
    return aioredis.Redis.from_pool(pool)
