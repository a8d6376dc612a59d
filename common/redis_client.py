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
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote, urlparse

import redis
import redis.asyncio as aioredis
import redis.sentinel
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import EqualJitterBackoff, ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

from common.settings import Settings, get_settings

RETRIES = 3


def pack_commands_with_hiredis() -> bool:
    """Make redis-py's asyncio connections pack commands with hiredis (C), as its blocking
    connections already do when hiredis is installed; redis-py's asyncio side packs them in
    Python (redis-py issue #4176, unreleased). A 13-argument EVALSHA took 13 us in Python
    and 2 us in hiredis, and every job's create, claim, appends and end are such commands
    (yappi: 8% of the API's and of the worker's CPU was the Python packer). The bytes are
    the same (tests/core/test_redis_pack.py); a connection whose encoding is not UTF-8
    with strict errors keeps the Python packer. hiredis is called directly: redis-py's own
    `HiredisRespSerializer` first walks every argument in Python for bytearrays and
    memoryviews (8 us of a 95-argument EVALSHA's 18); hiredis takes memoryviews itself, and
    what it refuses (a bytearray, or what redis-py refuses too) goes through that serializer,
    which converts or raises redis-py's DataError. True if hiredis packs."""
    try:
        import hiredis
        from redis.asyncio.connection import AbstractConnection
        from redis.connection import HiredisRespSerializer
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # another redis-py: its own packer stays
        return False
    if not HIREDIS_AVAILABLE:
        return False
    if getattr(AbstractConnection.pack_command, "_llmq_hiredis", False):
        return True
    python_pack = AbstractConnection.pack_command
    serializer_pack = HiredisRespSerializer().pack
    pack = hiredis.pack_command

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        encoder = self.encoder
        if encoder.encoding not in ("utf-8", "utf8") or encoder.encoding_errors != "strict":
            return python_pack(self, *args)
        # A command name of several words ("CONFIG GET") goes as several arguments, as
        # both of redis-py's packers send it.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [pack(args)]
        except TypeError:
            return serializer_pack(*args)

    pack_command._llmq_hiredis = True  # type: ignore[attr-defined]
    pack_command.__wrapped__ = python_pack  # type: ignore[attr-defined]
    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
    return True


pack_commands_with_hiredis()

# REDIS_RETRY_SECONDS unset, with REDIS_SENTINELS: a failover's length, and some.
SENTINEL_RETRY_SECONDS = 15.0
T = TypeVar("T")


def retry_policy(settings: Settings | None = None) -> Retry:
    """The asyncio clients' retries of a command that could not reach Redis: three quick
    ones, or for REDIS_RETRY_SECONDS (15 s with Sentinel, if unset), waits doubling from
    50 ms to 1 s. Every script answers the same when run twice (common/jobstore.py), so a
    retry after a lost reply is safe."""
    s = settings or get_settings()
    window = s.redis_retry_seconds
    if window is None and s.sentinels:
        window = SENTINEL_RETRY_SECONDS
    if window is None:
        return Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), RETRIES, (ConnectionError, TimeoutError))
    return WindowRetry(window)


class WindowRetry(Retry):
    """Retries for a time rather than a count: a failed attempt is retried while the
    window since the first one lasts (an attempt started inside it may end after it)."""

    def __init__(self, window: float):
        super().__init__(EqualJitterBackoff(base=0.05, cap=1.0), -1, (ConnectionError, TimeoutError))
        self.window = window

    async def call_with_retry(  # type: ignore[override]
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        deadline = time.monotonic() + self.window

        async def bounded(error: Exception, *count: int) -> None:
            await fail(error, *count)
            if time.monotonic() >= deadline:
                raise error

        return await super().call_with_retry(do, bounded, is_retryable, with_failure_count)


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


# How long asking a Sentinel where the primary is may take (then the next one is asked).
SENTINEL_TIMEOUT_SECONDS = 2.0


def uses_sentinel(url: str, settings: Settings | None = None) -> bool:
    """Whether connections to `url` find the primary through Sentinel: REDIS_SENTINELS is
    set and `url` is the service's REDIS_URL (other URLs are connected to directly)."""
    s = settings or get_settings()
    return bool(s.sentinels) and url == s.redis_url


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (connections go to the primary it names, found again after a
    failover) that waits for a free connection, as `connect`'s pool does."""


def _sentinel_params(url: str, s: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the primary's connection arguments from `url`, the Sentinels' own)."""
    parsed = urlparse(url)
    params: dict[str, Any] = {"db": int((parsed.path or "/0").lstrip("/") or 0)}
    if parsed.username:
        params["username"] = unquote(parsed.username)
    if parsed.password:
        params["password"] = unquote(parsed.password)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
        "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
        **tls_options(url, s),
    }
    if parsed.scheme == "rediss":
        sentinel_kwargs["ssl"] = True
    if s.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = s.redis_sentinel_password.get_secret_value()
    return params, sentinel_kwargs


def connect(url: str, max_connections: int = 256, pool_timeout: float = 20.0, **kwargs: object) -> aioredis.Redis:
    """An asyncio Redis client for `url` with the service's retry policy and a blocking pool
    (TLS as configured for a `rediss://` URL; the primary found through Sentinel if set)."""
    kwargs.setdefault("health_check_interval", 10)
    for name, value in tls_options(url).items():
        kwargs.setdefault(name, value)
    if uses_sentinel(url):
        return cast(
            aioredis.Redis,
            _sentinel_client(
                Sentinel,
                url,
                connection_pool_class=_BlockingSentinelPool,
                max_connections=max_connections,
                timeout=pool_timeout,
                retry=retry_policy(),
                **kwargs,
            ),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, retry=retry_policy(), **kwargs
    )
    return aioredis.Redis.from_pool(pool)


def client(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for `url` with redis-py's own pool and retries (the stream
    relay's pub/sub connection), TLS and Sentinel as `connect`."""
    for name, value in tls_options(url).items():
        kwargs.setdefault(name, value)
    if uses_sentinel(url):
        return cast(aioredis.Redis, _sentinel_client(Sentinel, url, **kwargs))
    return aioredis.from_url(url, **kwargs)


def _sentinel_client(sentinel_class: type[Any], url: str, /, **kwargs: Any) -> Any:
    """A client of the primary Sentinel names for `url` (`sentinel_class`: redis-py's
    asyncio `Sentinel` or its blocking one; `kwargs` for the primary's connections)."""
    s = get_settings()
    params, sentinel_kwargs = _sentinel_params(url, s)
    if urlparse(url).scheme == "rediss":
        kwargs["ssl"] = True  # Sentinel's pool picks its TLS connection class on it
    manager = sentinel_class(s.sentinels, sentinel_kwargs=sentinel_kwargs, **params)
    return manager.master_for(s.redis_sentinel_master, **kwargs)


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking Redis client for `url` (Flower's page), TLS and Sentinel as `connect`."""
    for name, value in tls_options(url).items():
        kwargs.setdefault(name, value)
    if uses_sentinel(url):
        return cast(redis.Redis, _sentinel_client(redis.sentinel.Sentinel, url, **kwargs))
    return redis.Redis.from_url(url, **kwargs)


def broker_settings(
    url: str, transport_options: dict[str, Any], transport: str | None, settings: Settings | None = None
) -> dict[str, Any]:
    """A Celery app's broker settings for `url` (`app.conf.update(**...)`): its URL, its
    transport (`transport`: llmq's, `common.broker:Transport`; None: kombu's own, as
    Flower runs), TLS (`broker_use_ssl`) and the transport options. With Sentinel, the URL
    lists the Sentinels (kombu's `sentinel://host:port;sentinel://...` form, with the
    primary's password and database), the transport is the Sentinel flavour, and the
    options name the primary (`master_name`) and the Sentinels' own password and TLS."""
    s = settings or get_settings()
    conf: dict[str, Any] = {
        "broker_url": url,
        "broker_use_ssl": broker_ssl(url, s),
        "broker_transport_options": dict(transport_options),
    }
    if transport is not None:
        conf["broker_transport"] = transport
    if not uses_sentinel(url, s):
        return conf
    parsed = urlparse(url)
    auth = ""
    if parsed.password:
        auth = f"{quote(unquote(parsed.username or ''), safe='')}:{quote(unquote(parsed.password), safe='')}@"
    db = (parsed.path or "/0").lstrip("/") or "0"
    conf["broker_url"] = ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in s.sentinels)
    if transport is not None:
        conf["broker_transport"] = "common.broker:SentinelTransport"
    _, sentinel_kwargs = _sentinel_params(url, s)
    conf["broker_transport_options"] |= {"master_name": s.redis_sentinel_master, "sentinel_kwargs": sentinel_kwargs}
    return conf
