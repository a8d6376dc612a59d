"""How REDIS_URL, REDIS_SENTINELS and REDIS_TLS_* become the settings of each kind of
connection (the connections themselves are tested on real servers: tests/core and
tests/integration test_redis_tls.py, test_redis_sentinel.py)."""

from __future__ import annotations

import ssl
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from common.redis_client import WindowRetry, broker_settings, retry_policy, uses_sentinel
from common.settings import Settings

OPTIONS = {"visibility_timeout": 60}


def test_without_sentinels_the_broker_is_redis_url_itself():
    s = Settings(redis_url="redis://:pw@db:6379/2")
    conf = broker_settings(s.redis_url, OPTIONS, "common.broker:Transport", s)
    assert conf == {
        "broker_url": "redis://:pw@db:6379/2",
        "broker_transport": "common.broker:Transport",
        "broker_use_ssl": None,
        "broker_transport_options": OPTIONS,
    }
    assert not uses_sentinel(s.redis_url, s)


def test_with_sentinels_the_broker_lists_them_and_names_the_primary():
    s = Settings(
        redis_url="redis://user:p%40ss@ignored:6379/3",
        redis_sentinels="s1:26379, s2:26380",
        redis_sentinel_master="prod",
        redis_sentinel_password="sentinel-pw",
    )
    assert s.sentinels == [("s1", 26379), ("s2", 26380)]
    assert uses_sentinel(s.redis_url, s) and not uses_sentinel("redis://other:6379/0", s)
    conf = broker_settings(s.redis_url, OPTIONS, "common.broker:Transport", s)
    assert conf["broker_url"] == "sentinel://user:p%40ss@s1:26379/3;sentinel://user:p%40ss@s2:26380/3"
    assert conf["broker_transport"] == "common.broker:SentinelTransport"
    options = conf["broker_transport_options"]
    assert options["visibility_timeout"] == 60 and options["master_name"] == "prod"
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert OPTIONS == {"visibility_timeout": 60}  # the caller's options are not changed
    # Flower runs kombu's own transport: the URL's scheme picks its Sentinel flavour.
    assert "broker_transport" not in broker_settings(s.redis_url, OPTIONS, None, s)


def test_sentinels_over_tls(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    s = Settings(redis_url="rediss://db:6380/0", redis_sentinels="s1:26379", redis_tls_ca_file=str(ca))
    conf = broker_settings(s.redis_url, OPTIONS, "common.broker:Transport", s)
    assert conf["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    sentinel_kwargs = conf["broker_transport_options"]["sentinel_kwargs"]
    assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["ssl_ca_certs"] == str(ca)


@pytest.mark.parametrize("bad", ["s1", "s1:", ":26379", "s1:port", "s1:70000", "s1:26379,s2"])
def test_a_malformed_sentinel_list_is_a_settings_error(bad):
    with pytest.raises(ValueError, match="host:port"):
        Settings(redis_sentinels=bad)


def test_retries_last_a_window_with_sentinel_or_redis_retry_seconds_and_three_without():
    plain = retry_policy(Settings())
    assert not isinstance(plain, WindowRetry) and plain._retries == 3
    assert isinstance(retry_policy(Settings(redis_sentinels="s1:26379")), WindowRetry)
    assert retry_policy(Settings(redis_sentinels="s1:26379")).window == 15.0
    assert retry_policy(Settings(redis_retry_seconds=2)).window == 2


@pytest.mark.asyncio
async def test_a_window_retry_goes_on_until_the_window_has_passed():
    """A command failing to reach Redis is tried again until the window ends, then fails
    with the last error; one that gets through inside the window succeeds."""
    failures: list[Exception] = []

    async def fail(error: Exception) -> None:
        failures.append(error)

    async def never() -> str:
        raise RedisConnectionError("refused")

    # The waits after failures 1..4 are at most 0.1, 0.2, 0.4 and 0.8 s (doubling from 50
    # ms, jittered down to half): within 1.5 s a fifth attempt has always been made. (With
    # 0.6 s, long waits could end it at the fourth: seen failing.)
    retry = WindowRetry(1.5)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await retry.call_with_retry(never, fail)
    assert time.monotonic() - started >= 1.5
    assert len(failures) > 4  # past the three retries of the plain policy

    attempts = 0

    async def third_time() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RedisConnectionError("refused")
        return "ok"

    assert await WindowRetry(5).call_with_retry(third_time, fail) == "ok" and attempts == 3
