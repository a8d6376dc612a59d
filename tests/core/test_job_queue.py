"""JobQueue on a real Redis: Celery builds each job's message and task-sent event as
always; they go to Redis through the caller's asyncio client in one pipeline, with no
thread hand-off once the producer's channel is made (issue 12). A Celery consumer reads
the messages as any Celery message, interactive ones before batch lines."""

from __future__ import annotations

import asyncio
import base64
import json
import time

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


def _decoded(commands):
    """Each command's name, key and payload, its base64 body decoded, without what Celery
    makes anew for every message (delivery tag, the event's clock tick and time)."""
    out = []
    for name, (key, raw) in commands:
        payload = json.loads(raw)
        payload["body"] = json.loads(base64.b64decode(payload["body"]))
        del payload["properties"]["delivery_tag"]
        if name == "publish":
            assert isinstance(payload["body"].pop("clock"), int)
            assert abs(payload["body"].pop("timestamp") - time.time()) < 60
        out.append((name, keys.text(key), payload))
    return out


async def test_messages_made_from_a_template_are_celerys(redis, redis_url):
    """After the first job of a model and priority, JobQueue makes each job's message and
    event from that job's (not through Celery's send_task, about 200 us a job): they are
    what Celery makes, but for the delivery tags, clock ticks and times."""
    queue = JobQueue(redis_url, 120)
    try:
        await queue.submit("chatcmpl-warm", "m")
        for priority in (keys.CHAT_PRIORITY, keys.BATCH_PRIORITY):
            ids = [f"chatcmpl-t{priority}-{i}" for i in range(4)]
            made = queue._messages(ids, "m", priority)
            assert (("m", priority)) in queue._templates
            celerys = queue._celery_messages(ids, "m", priority)
            assert _decoded(made) == _decoded(celerys)
            assert len({json.loads(raw)["properties"]["delivery_tag"] for _, (_, raw) in made}) == 8
            clocks = [
                json.loads(base64.b64decode(json.loads(raw)["body"]))["clock"] for n, (_, raw) in made if n == "publish"
            ]
            assert clocks == sorted(set(clocks))  # the app's clock moves on, once an event
        # Another model's first job is Celery's own (and its template then made).
        first = queue._messages(["chatcmpl-other"], "other", keys.CHAT_PRIORITY)
        assert ("other", keys.CHAT_PRIORITY) in queue._templates
        assert _decoded(first) == _decoded(queue._celery_messages(["chatcmpl-other"], "other", keys.CHAT_PRIORITY))
    finally:
        await queue.aclose()


async def test_groups_go_out_as_one_message_each(redis, redis_url):
    """`submit_groups` (a batch's lines): one Celery message a group, the group task with
    the job ids as its argument, in one round trip; a group of one is an ordinary job
    message. A Celery consumer reads them as any message, with a task-sent event each."""
    r = redis_lib.Redis.from_url(redis_url)
    events = r.pubsub()
    events.psubscribe("*celeryev*")
    events.get_message(timeout=1)
    queue = JobQueue(redis_url, 120)
    try:
        groups = [[f"chatcmpl-g{i}-{k}" for k in range(3)] for i in range(2)] + [["chatcmpl-alone"]]
        await queue.submit_groups(groups, "m", keys.BATCH_PRIORITY)
    finally:
        await queue.aclose()
    sent = []
    while (message := events.get_message(timeout=0.5)) is not None:
        if message["type"] == "pmessage":
            sent.append(json.loads(message["data"]))
    assert len(sent) == 3
    received: list[tuple[str, str, object]] = []
    with Connection(redis_url, transport="common.broker:Transport") as conn:
        consumer = Consumer(
            conn.channel(),
            queues=[keys.chat_queue_entity("m")],
            callbacks=[lambda body, m: received.append((m.headers["task"], m.headers["id"], body[0][0]))],
            accept=["json"],
        )
        consumer.qos(prefetch_count=16)
        consumer.consume()
        conn.drain_events(timeout=5)
        consumer.cancel()
    by_task = sorted((task, arg) for task, _, arg in received)
    assert by_task == [
        (keys.CHAT_TASK, "chatcmpl-alone"),
        (keys.CHAT_GROUP_TASK, groups[0]),
        (keys.CHAT_GROUP_TASK, groups[1]),
    ]
    # Each group has a task id of its own (Flower lists them apart).
    assert len({task_id for _, task_id, _ in received}) == 3
