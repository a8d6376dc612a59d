"""A Celery send to a Redis that accepts the connection and never answers (a half-open
connection: a NAT or proxy dropped it) fails after the send timeout, with the queue's
503, instead of hanging: with the API's message groups a hung send held every job queued
behind it (issue 12 review)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from common.errors import ServiceUnavailableError
from common.job_queue import JobQueue


@pytest.fixture
def silent_redis():
    """A TCP server that accepts connections, reads what it is sent and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


async def test_a_send_to_a_redis_that_never_answers_fails_instead_of_hanging(silent_redis):
    queue = JobQueue(silent_redis, 120, send_timeout=0.3)
    try:
        with pytest.raises(ServiceUnavailableError):
            # The guard only: without the send timeout it waits until TCP gives up.
            await asyncio.wait_for(queue.submit("chatcmpl-x", "m"), 30)
        with pytest.raises(ServiceUnavailableError):
            await asyncio.wait_for(queue.submit_many(["chatcmpl-y", "chatcmpl-z"], "m"), 30)
    finally:
        await queue.aclose()
