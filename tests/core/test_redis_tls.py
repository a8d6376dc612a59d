"""TLS to Redis (`rediss://` REDIS_URL, REDIS_TLS_* settings), on a real Redis that speaks
TLS only and requires client certificates: every kind of connection the service makes
(its asyncio clients, the stream relay's pub/sub, Celery's producer and consumer through
llmq's broker transport) verifies Redis's certificate against the configured CA and shows
its client certificate. A Redis whose certificate another CA signed is refused."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery
from kombu import Consumer

from api.relay import StreamRelay
from common import keys
from common import redis_client as redis_client_module
from common.errors import ServiceUnavailableError
from common.job_queue import JobQueue
from common.jobs import ChunkEvent
from common.redis_client import broker_ssl, connect, tls_options
from common.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import free_port, make_tls_files, redis_answers  # noqa: E402


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(rediss URL, the files of its CA, the files of another CA)."""
    ours = make_tls_files(tmp_path_factory.mktemp("tls"))
    other = make_tls_files(tmp_path_factory.mktemp("tls-other"), name="another CA")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(ours / "server.crt"), "--tls-key-file", str(ours / "server.key")),
            *("--tls-ca-cert-file", str(ours / "ca.crt"), "--tls-auth-clients", "yes"),
            *("--save", "", "--appendonly", "no", "--dir", str(ours)),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not redis_answers(port, ours):
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server (TLS) did not start")
            time.sleep(0.05)
        yield f"rediss://127.0.0.1:{port}/0", ours, other
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def settings_for(url: str, ca: Path, client: Path, verify: bool = True) -> Settings:
    return Settings(
        redis_url=url,
        redis_tls_ca_file=str(ca / "ca.crt"),
        redis_tls_cert_file=str(client / "client.crt"),
        redis_tls_key_file=str(client / "client.key"),
        redis_tls_verify=verify,
    )


@pytest.fixture
def use_settings(monkeypatch):
    """Make the service's connections read `settings` (as they read the environment's)."""

    def use(settings: Settings) -> None:
        monkeypatch.setattr(redis_client_module, "get_settings", lambda: settings)

    return use


async def test_every_connection_speaks_tls_and_shows_its_client_certificate(tls, use_settings):
    url, ours, _ = tls
    settings = settings_for(url, ours, ours)
    use_settings(settings)
    client = connect(url)
    relay = StreamRelay(url, 16)
    queue = JobQueue(url, 120)
    try:
        assert await client.ping()
        # The relay's pub/sub connection: an event published reaches a subscriber.
        await relay.start()
        sub = await relay.subscribe(keys.job_channel("chatcmpl-tls"))
        event = ChunkEvent(seq=0, kind="delta")
        await client.publish(keys.job_channel("chatcmpl-tls"), event.encode())
        got = await asyncio.wait_for(sub.get(), 5)
        assert got.seq == 0 and got.kind == "delta"
        # Celery's producer (made in a thread, through llmq's transport), then a send.
        await queue.submit("chatcmpl-tls", "m")
    finally:
        await queue.aclose()
        await relay.stop()
        await client.aclose()
    # A Celery consumer configured as the worker's reads the message over TLS.
    app = Celery("tls-consumer", broker=url)
    app.conf.update(
        broker_transport="common.broker:Transport",
        broker_use_ssl=broker_ssl(url, settings),
        broker_transport_options=keys.broker_transport_options(120),
    )
    received: list[str] = []
    with app.connection_for_read() as conn:
        consumer = Consumer(
            conn.channel(),
            queues=[keys.chat_queue_entity("m")],
            callbacks=[lambda body, m: received.append(body[0][0])],
            accept=["json"],
        )
        consumer.qos(prefetch_count=4)
        consumer.consume()
        conn.drain_events(timeout=5)
        consumer.cancel()
    assert received == ["chatcmpl-tls"]
    app.close()


async def test_a_redis_whose_certificate_another_ca_signed_is_refused(tls, use_settings):
    url, ours, other = tls
    # Trusting another CA (with our client certificate, which Redis accepts).
    use_settings(
        Settings(
            redis_url=url,
            redis_tls_ca_file=str(other / "ca.crt"),
            redis_tls_cert_file=str(ours / "client.crt"),
            redis_tls_key_file=str(ours / "client.key"),
        )
    )
    client = connect(url, health_check_interval=0)
    with pytest.raises(redis_lib.exceptions.ConnectionError, match="certificate verify failed"):
        await client.ping()
    await client.aclose()
    queue = JobQueue(url, 120, send_timeout=2)
    with pytest.raises(ServiceUnavailableError):
        await queue.submit("chatcmpl-refused", "m")
    await queue.aclose()
    # Trusting the system's CAs only (no REDIS_TLS_CA_FILE): the same.
    use_settings(
        Settings(
            redis_url=url, redis_tls_cert_file=str(ours / "client.crt"), redis_tls_key_file=str(ours / "client.key")
        )
    )
    client = connect(url, health_check_interval=0)
    with pytest.raises(redis_lib.exceptions.ConnectionError, match="certificate verify failed"):
        await client.ping()
    await client.aclose()


async def test_without_verification_it_is_encrypted_but_trusts_anyone(tls, use_settings):
    url, ours, other = tls
    use_settings(settings_for(url, other, ours, verify=False))
    client = connect(url)
    assert await client.ping()
    await client.aclose()


async def test_without_a_client_certificate_redis_refuses(tls, use_settings):
    url, ours, _ = tls
    use_settings(Settings(redis_url=url, redis_tls_ca_file=str(ours / "ca.crt")))
    client = connect(url, health_check_interval=0)
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        await client.ping()
    await client.aclose()


def test_a_plain_url_has_no_tls_options(tmp_path):
    files = make_tls_files(tmp_path)
    settings = settings_for("redis://127.0.0.1:6379/0", files, files)
    assert tls_options("redis://127.0.0.1:6379/0", settings) == {}
    assert broker_ssl("redis://127.0.0.1:6379/0", settings) is None
    options = tls_options("rediss://127.0.0.1:6380/0", settings)
    assert options["ssl_ca_certs"] == str(files / "ca.crt") and options["ssl_check_hostname"] is True


def test_a_tls_file_that_is_not_there_is_a_settings_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        Settings(redis_tls_ca_file=str(tmp_path / "missing.pem"))
