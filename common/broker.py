"""The Redis broker transport of every llmq Celery app (API, workers, Flower): kombu's,
made to survive a Redis restart while jobs are running, and without a Redis client built
for every command.

kombu's channel builds a new redis-py client (a few hundred response callbacks copied into
a dict) for every command it sends outside its BRPOP connection: each acknowledgement,
each task event, each message the API sends. That was about 10% of a worker's CPU with a
fast engine (issue 12: py-spy, bench/bench_ceiling.py). Here a channel keeps one client
on its connection pool (redis-py clients are safe to share between threads: each command
takes a connection from the pool) and builds a new one only when the pool is replaced
(kombu drops its pools when the connection is lost).

With late acks, a job running when Redis goes away holds an unacknowledged message from
the old connection. kombu 5.7 crashes the worker on it twice over ("'NoneType' object
has no attribute ..." in `_connparams`): when closing the lost connection it tries to
put such messages back through that connection, and when the job ends it acknowledges
the message through the old, closed channel. Here both are skipped. Nothing is lost by
that: the broker redelivers an unacknowledged message after the visibility timeout, jobs
whose worker died are re-queued by the reaper, and a job claims its record before it
runs, so a redelivered message of a job that already ran is acknowledged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis
from kombu.transport.virtual import base
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class QoS(redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)
        base.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            super().reject(delivery_tag, requeue=True)
            return
        self._forget(delivery_tag)
        base.QoS.ack(self, delivery_tag)

    def _forget(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()
        except (AttributeError, RedisError, OSError) as exc:
            # Delivered on a connection that has since closed (Redis restarted).
            log.warning(
                "could not acknowledge message %s on its closed channel (%s); "
                "the broker will redeliver it and it will be skipped",
                delivery_tag,
                exc,
            )


class Channel(redis.Channel):
    QoS = QoS
    do_restore = False
    _shared: tuple[Any, Any] | None = None  # (the pool, a client on it)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        shared = self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())
        yield shared[1]


class Transport(redis.Transport):
    Channel = Channel
