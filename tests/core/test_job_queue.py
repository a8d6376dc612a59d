"""JobQueue on a real Redis: Celery builds each job's message and task-sent event as
always; they go to Redis through the caller's asyncio client in one pipeline, with no
thread hand-off once the producer's channel is made (issue 12). A Celery consumer reads
the messages as any Celery message, interactive ones before batch lines."""

from __future__ import annotations

import asyncio
import json

import anyio.to_thread
import pytest
import redis as redis_lib
from kombu import Connection, Consumer

from common import keys
from common.job_queue import JobQueue

pytestmark = pytest.mark.asyncio


async def test_messages_go_out_on_the_loop_and_read_as_celery_messages(redis, redis_url, monkeypatch):
    r = redis_lib.Redis.from_url(redis_url)
    queue = JobQueue(redis_url, 120)
    events = r.pubsub()
    events.psubscribe("*celeryev*")
    events.get_message(timeout=1)
    try:
        await queue.submit("chatcmpl-warm", "m")  # makes the producer's channel, in a thread
        threads = 0
        run_sync = anyio.to_thread.run_sync

        async def counting(*args, **kwargs):
            nonlocal threads
            threads += 1
            return await run_sync(*args, **kwargs)

        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        await queue.submit_many([f"chatcmpl-b{i}" for i in range(3)], "m", keys.BATCH_PRIORITY)
        await asyncio.gather(*(queue.submit(f"chatcmpl-c{i}", "m") for i in range(3)))
        assert threads == 0
    finally:
        await queue.aclose()
    # Flower's task-sent events, one a message.
    sent = []
    while (message := events.get_message(timeout=0.5)) is not None:
        if message["type"] == "pmessage":
            sent.append(json.loads(message["data"]))
    assert len([m for m in sent if m["headers"]["hostname"]]) == 7
    # A Celery consumer takes them as any message: the interactive ones first.
    received: list[tuple[str, list[str]]] = []
    with Connection(redis_url, transport="common.broker:Transport") as conn:
        consumer = Consumer(
            conn.channel(),
            queues=[keys.chat_queue_entity("m")],
            callbacks=[lambda body, m: received.append((m.headers["task"], body[0]))],
            accept=["json"],
        )
        consumer.qos(prefetch_count=16)
        consumer.consume()
        conn.drain_events(timeout=5)
        consumer.cancel()
    tasks = {task for task, _ in received}
    ids = [args[0] for _, args in received]
    assert tasks == {keys.CHAT_TASK}
    assert sorted(ids[:4]) == ["chatcmpl-c0", "chatcmpl-c1", "chatcmpl-c2", "chatcmpl-warm"]
    assert ids[4:] == ["chatcmpl-b0", "chatcmpl-b1", "chatcmpl-b2"]
