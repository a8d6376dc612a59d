"""llmq's kombu transport (common/broker.py) on a real Redis: a channel sends its commands
through one Redis client instead of building one per command (issue 12: about 10% of a
worker's CPU), builds a new one when kombu replaces its pool, and messages still go out
and come back through it."""

from __future__ import annotations

import json
import time

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


def test_a_brpop_that_brings_a_message_brings_what_the_prefetch_allows(redis_url):
    """kombu took one message per BRPOP, a turn of the consumer's loop each: a burst of jobs
    reached a worker one by one (issue 12). A BRPOP that brings one is followed by as many
    more as the prefetch allows, the higher priority first, delivered in the same turn; the
    rest stay queued."""
    from kombu import Connection, Consumer

    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("burst-test")
    for i in range(3):
        app.send_task(keys.CHAT_TASK, args=[f"b{i}"], task_id=f"b{i}", queue=queue, priority=keys.BATCH_PRIORITY)
    for i in range(3):
        app.send_task(keys.CHAT_TASK, args=[f"c{i}"], task_id=f"c{i}", queue=queue, priority=keys.CHAT_PRIORITY)
    received: list[str] = []
    with Connection(redis_url, transport="common.broker:Transport") as conn:
        channel = conn.channel()
        consumer = Consumer(
            channel,
            queues=[queue],
            callbacks=[lambda body, message: received.append(message.headers["id"])],
            accept=["json"],
        )
        consumer.qos(prefetch_count=4)
        consumer.consume()
        conn.drain_events(timeout=5)
        # One BRPOP: four messages, the interactive ones first, in the order they were sent.
        assert received[:3] == ["c0", "c1", "c2"]
        assert received[3:] == ["b0"]
        # Unacknowledged, as a BRPOP'd message is (redelivered if the consumer dies).
        assert r.hlen("unacked") == 4
        # Nothing more is taken while the prefetch is used up; acking makes room.
        consumer.cancel()
    app.close()
    remaining = sum(r.llen(k) for k in r.keys(f"{queue.name}*"))
    assert remaining == 2


def test_a_turn_takes_at_most_sixteen_so_idle_workers_share_a_burst(redis_url):
    """Two idle workers and a burst: the first to wake must not take all it has slots for
    while the other waits (a turn takes at most 1 + POP_MORE_MAX messages)."""
    from kombu import Connection, Consumer

    from common.broker import POP_MORE_MAX

    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("share-test")
    with app.producer_or_acquire() as producer, producer.batch(max_size=200):
        for i in range(40):
            app.send_task(keys.CHAT_TASK, args=[f"j{i}"], task_id=f"j{i}", queue=queue, producer=producer)
    received: list[str] = []
    with Connection(redis_url, transport="common.broker:Transport") as conn:
        consumer = Consumer(
            conn.channel(),
            queues=[queue],
            callbacks=[lambda body, m: received.append(m.headers["id"])],
            accept=["json"],
        )
        consumer.qos(prefetch_count=64)
        consumer.consume()
        conn.drain_events(timeout=5)
        assert len(received) == 1 + POP_MORE_MAX
        consumer.cancel()
    app.close()


def test_messages_taken_after_a_brpop_are_recorded_as_unacknowledged_in_the_same_call(redis_url):
    """The messages popped after a BRPOP are recorded as unacknowledged by the script that
    pops them, as kombu records one (its tag in the index, [message, exchange, routing
    key] in the hash), not with a MULTI/EXEC round trip each (about 18% of a worker's
    time under a batch of lines); a consumer that fails before handing them on leaves
    them to be restored, not lost."""
    import json

    from kombu import Connection, Consumer

    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("record-test")
    for i in range(6):
        app.send_task(keys.CHAT_TASK, args=[f"r{i}"], task_id=f"r{i}", queue=queue)
    pushed = {json.loads(m)["headers"]["id"]: json.loads(m) for m in r.lrange(queue.name, 0, -1)}
    received: list[str] = []

    def take(body, message):
        received.append(message.headers["id"])
        if len(received) == 2:
            raise RuntimeError("the consumer fails here")

    r.config_resetstat()
    options = {"visibility_timeout": 1}
    with Connection(redis_url, transport="common.broker:Transport", transport_options=options) as conn:
        channel = conn.channel()
        consumer = Consumer(channel, queues=[queue], callbacks=[take], accept=["json"])
        consumer.qos(prefetch_count=4)
        consumer.consume()
        try:
            conn.drain_events(timeout=5)
        except RuntimeError:
            pass
        assert received == ["r0", "r1"]
        # Four taken in the turn (one by BRPOP, three by the script), all recorded, with
        # fewer MULTI/EXECs than messages (kombu's: one a message, and one more).
        unacked = {tag.decode(): json.loads(raw) for tag, raw in r.hgetall("unacked").items()}
        assert len(unacked) == 4 and r.zcard("unacked_index") == 4
        assert int(r.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)) < 4
        for message, exchange, routing_key in unacked.values():
            assert message == pushed[message["headers"]["id"]]
            assert (exchange, routing_key) == ("", queue.name)
        # Two messages were never handed on (the consumer failed): restored with the rest
        # once the visibility timeout has passed.
        time.sleep(1.2)
        channel.qos.restore_visible(num=10)
        consumer.cancel()
    app.close()
    assert r.hlen("unacked") == 0
    back = sorted(json.loads(m)["headers"]["id"] for m in r.lrange(queue.name, 0, -1))
    assert back == [f"r{i}" for i in range(6)]


def test_acks_that_come_together_share_a_round_trip_and_none_is_left_behind(redis_url):
    """Task threads that end together ack together: while one writes, the others' acks
    wait for its next round trip (kombu: a MULTI/EXEC each, about 8% of a worker's time
    under a batch). Every one is written: none is left pending when the writing ends."""
    import threading
    from contextlib import contextmanager

    from kombu import Connection, Consumer

    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("ack-test")
    for i in range(16):
        app.send_task(keys.CHAT_TASK, args=[f"a{i}"], task_id=f"a{i}", queue=queue)
    messages: list = []
    with Connection(redis_url, transport="common.broker:Transport") as conn:
        channel = conn.channel()
        consumer = Consumer(channel, queues=[queue], callbacks=[lambda b, m: messages.append(m)], accept=["json"])
        consumer.qos(prefetch_count=16)
        consumer.consume()
        conn.drain_events(timeout=5)
        assert len(messages) == 16 and r.hlen("unacked") == 16
        qos = channel.qos
        others_done = threading.Event()
        first_write = threading.Event()
        original = qos.pipe_or_acquire

        @contextmanager
        def held_first(pipe=None, client=None):
            if not first_write.is_set():
                first_write.set()
                assert others_done.wait(10)  # the other 15 ack while the first one writes
            with original(pipe, client) as p:
                yield p

        qos.pipe_or_acquire = held_first
        r.config_resetstat()
        first = threading.Thread(target=messages[0].ack)
        first.start()
        assert first_write.wait(10)
        others = [threading.Thread(target=m.ack) for m in messages[1:]]
        for t in others:
            t.start()
        for t in others:
            t.join(10)  # they return at once: the first thread writes their acks
        others_done.set()
        first.join(10)
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
        assert int(r.info("commandstats")["cmdstat_exec"]["calls"]) == 2
        consumer.cancel()
    app.close()


def test_the_message_a_brpop_brings_is_handed_on_before_it_is_recorded(redis_url):
    """kombu records a BRPOP'd message as unacknowledged (a MULTI/EXEC round trip) before
    handing it on: a round trip between every job's message and its start. Here it is
    handed on first, then recorded by the script that pops the messages behind it (no
    MULTI/EXEC of its own), and every message is recorded once the turn is over."""
    from kombu import Connection, Consumer

    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("defer-test")
    for i in range(3):
        app.send_task(keys.CHAT_TASK, args=[f"d{i}"], task_id=f"d{i}", queue=queue)
    seen: list[tuple[str, bool]] = []

    def take(body, message):
        seen.append((message.headers["id"], r.hexists("unacked", message.delivery_tag)))

    r.config_resetstat()
    with Connection(redis_url, transport="common.broker:Transport") as conn:
        consumer = Consumer(conn.channel(), queues=[queue], callbacks=[take], accept=["json"])
        consumer.qos(prefetch_count=4)
        consumer.consume()
        conn.drain_events(timeout=5)
        # The first was handed on before anything was written of it; the two behind it
        # were recorded by the script that popped them, before they were handed on.
        assert seen == [("d0", False), ("d1", True), ("d2", True)]
        assert r.hlen("unacked") == 3 and r.zcard("unacked_index") == 3
        # No MULTI/EXEC of a record (the one EXEC is the queue's declaration: LLENs).
        stats = r.info("commandstats")
        assert int(stats.get("cmdstat_exec", {}).get("calls", 0)) <= 1
        assert int(stats["cmdstat_hset"]["calls"]) == 3
        consumer.cancel()
    app.close()


def test_a_brpop_message_acked_or_failed_before_its_record_is_written(redis_url):
    """Acknowledged while being handed on (its job already over): never recorded, so never
    restored and run again. Its delivery failed: recorded all the same, and restored."""
    from kombu import Connection, Consumer

    r = redis_lib.Redis.from_url(redis_url)
    r.flushall()
    app = _app(redis_url)
    queue = keys.chat_queue_entity("defer-ack-test")
    app.send_task(keys.CHAT_TASK, args=["a0"], task_id="a0", queue=queue)
    options = {"visibility_timeout": 1}
    with Connection(redis_url, transport="common.broker:Transport", transport_options=options) as conn:
        channel = conn.channel()
        consumer = Consumer(channel, queues=[queue], callbacks=[lambda b, m: m.ack()], accept=["json"])
        consumer.qos(prefetch_count=4)
        consumer.consume()
        conn.drain_events(timeout=5)
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
        consumer.cancel()

        app.send_task(keys.CHAT_TASK, args=["f0"], task_id="f0", queue=queue)

        def fail(body, message):
            raise RuntimeError("the consumer fails here")

        consumer = Consumer(channel, queues=[queue], callbacks=[fail], accept=["json"])
        consumer.qos(prefetch_count=4)
        consumer.consume()
        try:
            conn.drain_events(timeout=5)
        except RuntimeError:
            pass
        assert r.hlen("unacked") == 1
        time.sleep(1.2)
        channel.qos.restore_visible(num=10)
        consumer.cancel()
    app.close()
    back = [json.loads(m)["headers"]["id"] for m in r.lrange(queue.name, 0, -1)]
    assert back == ["f0"]
