"""llmq's kombu transport (common/broker.py) on a real Redis: a channel sends its commands
through one Redis client instead of building one per command (issue 12: about 10% of a
worker's CPU), builds a new one when kombu replaces its pool, and messages still go out
and come back through it."""

from __future__ import annotations

import redis as redis_lib
from celery import Celery

from common import keys


def _app(redis_url: str) -> Celery:
    app = Celery("llmq-test-broker", broker=redis_url)
    app.conf.update(broker_transport="common.broker:Transport", task_send_sent_event=True)
    return app


def test_a_channel_reuses_one_client_until_its_pool_is_replaced(redis_url):
    redis_lib.Redis.from_url(redis_url).flushall()
    app = _app(redis_url)
    built: list[object] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        create = channel._create_client

        def counting_create(*args, **kwargs):
            client = create(*args, **kwargs)
            built.append(client)
            return client

        channel._create_client = counting_create
        with channel.conn_or_acquire() as first:
            first.ping()
        with channel.conn_or_acquire() as second:
            second.ping()
        assert first is second
        assert len(built) == 1
        # A client handed in is used as it is.
        other = redis_lib.Redis.from_url(redis_url)
        with channel.conn_or_acquire(other) as given:
            assert given is other
        # kombu drops its pools when the connection is lost: the next command gets a
        # client on the new pool, not one holding the old.
        channel._pool = None
        with channel.conn_or_acquire() as third:
            third.ping()
        assert third is not first
        assert third.connection_pool is channel.pool
        assert len(built) == 2
    app.close()


def test_messages_and_task_events_go_out_through_the_shared_client(redis_url):
    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("broker-test")
    sent = 0
    for i in range(5):
        app.send_task(keys.CHAT_TASK, args=[f"job-{i}"], task_id=f"job-{i}", queue=queue)
        sent += 1
    # Every message is in the queue (kombu LPUSHes to the queue's list; priority 0 is the
    # bare name), the same client each time.
    assert r.llen(queue.name) == sent
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        got = [channel.basic_get(queue.name, no_ack=True) for _ in range(sent)]
    assert sorted(m.headers["id"] for m in got if m is not None) == [f"job-{i}" for i in range(sent)]
    app.close()
