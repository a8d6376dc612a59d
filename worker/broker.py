"""The worker's Redis broker transport: kombu's, made to survive a Redis restart while
jobs are running.

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


class Transport(redis.Transport):
    Channel = Channel
