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

kombu also takes one message per BRPOP, a turn of the consumer's event loop each: a burst
of jobs reached a worker one by one, 3 ms apart at best and far more while its engine
held the GIL, and missed the engine's next step together (issue 12: the Celery hop was
30 ms p50 at 8 streams, 211 ms at 64). Here a BRPOP that brings a message is followed at
once by popping as many more as the consumer's prefetch allows, at most POP_MORE_MAX
(one script call, the consumer's queues in the order BRPOP reads them: priorities first),
all delivered in the same turn. (The cap keeps a burst shared between idle workers: the
first to wake would otherwise take all it has slots for, while another waits idle.)
The script that pops them also records them as unacknowledged (as kombu's QoS does,
one MULTI/EXEC round trip a message: about 18% of a worker's time under a batch's
lines), so a consumer that dies before handing them all on leaves them to be restored
after the visibility timeout; a reply lost mid-way loses them as a lost BRPOP reply does,
and the job sweeper sends them again. The message BRPOP brought is recorded by that same
script, after it has been handed on: kombu records it first, a round trip between every
job's message and its start (and one more round trip each time the consumer wakes). A
consumer that dies in between leaves that one message unrecorded, as a lost BRPOP reply
would: its job is still queued, and the sweeper sends it again. One acknowledged before
the script ran (a job already over) is not recorded at all.

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
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from kombu.transport import redis
from kombu.transport.virtual import base
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class QoS(redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks = _Acks()

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        recorded = channel._recorded
        if delivery_tag in recorded:
            # Already recorded in Redis by the script that popped it (`_POP_MORE`).
            recorded.discard(delivery_tag)
            base.QoS.append(self, message, delivery_tag)
            return
        if channel._deferring:
            # The message a BRPOP brought: recorded by the script that runs once it has
            # been handed on (`Channel._brpop_read`).
            base.QoS.append(self, message, delivery_tag)
            info = message.delivery_info
            with channel._unrecorded_lock:
                channel._unrecorded[delivery_tag] = dumps([message._raw, info["exchange"], info["routing_key"]])
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not self.channel._drop_unrecorded(delivery_tag):
            self._forget(delivery_tag)
        base.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel._record_unrecorded()
            super().reject(delivery_tag, requeue=True)
            return
        if not self.channel._drop_unrecorded(delivery_tag):
            self._forget(delivery_tag)
        base.QoS.ack(self, delivery_tag)

    def _forget(self, delivery_tag: str) -> None:
        """Take the message out of the unacknowledged ones in Redis. Acks from task
        threads that end together share a round trip: the first becomes the one that
        writes, for all that come while it does (a MULTI/EXEC each was about 8% of a
        worker's time under a batch's lines); the others return at once. An ack not yet
        written when the worker dies leaves its message to be redelivered after the
        visibility timeout, and dropped (its job's claim is refused: it has ended)."""
        state = self._acks
        with state.lock:
            state.pending.append(delivery_tag)
            if state.writing:
                return
            state.writing = True
        try:
            while True:
                with state.lock:
                    tags, state.pending = state.pending, []
                    if not tags:
                        state.writing = False  # in the same hold of the lock as the look
                        return
                try:
                    with self.pipe_or_acquire() as pipe:
                        pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
                except (AttributeError, RedisError, OSError) as exc:
                    # Delivered on a connection that has since closed (Redis restarted).
                    log.warning(
                        "could not acknowledge message(s) %s on its closed channel (%s); "
                        "the broker will redeliver them and they will be skipped",
                        ", ".join(tags),
                        exc,
                    )
        except BaseException:
            with state.lock:
                state.writing = False
            raise


class _Acks:
    """Acknowledgements waiting to be written (`QoS._forget`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[str] = []
        self.writing = False


# -- messages built here, sent by the caller --------------------------------------------

_capture = threading.local()


@contextmanager
def captured_commands() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Within it, what a producer batch (`Producer.batch`) on this thread would send to
    Redis (LPUSH of each message to its queue's list, PUBLISH of each event) is kept in
    the list it yields instead, for the caller to send: the API sends its messages with
    its asyncio Redis client, on its event loop, without a thread hand-off and kombu's
    blocking client (issue 12). The messages are built by Celery and kombu as always,
    byte for byte."""
    commands: list[tuple[str, tuple[Any, ...]]] = []
    _capture.commands = commands
    try:
        yield commands
    finally:
        _capture.commands = None


class _Recorder:
    """Stands for a Redis pipeline: each command called on it is kept."""

    def __init__(self, commands: list[tuple[str, tuple[Any, ...]]]):
        self._commands = commands
        self._start = len(commands)

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self._commands.append((name, args))

        return record

    def reset(self) -> None:
        del self._commands[self._start :]

    def execute(self) -> list[Any]:
        return []


class CapturedBatch(redis.PublishBatch):
    """A publish batch that keeps its Redis commands (see `captured_commands`)."""

    def __init__(self, channel: Any, max_size: int, commands: list[tuple[str, tuple[Any, ...]]]):
        self.channel = channel
        self.max_size = max_size
        self._buffered = 0
        self._collecting = None
        self._failed = None
        self._aborted = False
        self._closed = False
        self._stack = ExitStack()
        self.pipeline = _Recorder(commands)


# The most messages taken after one a BRPOP brought (so at most 16 a turn).
POP_MORE_MAX = 15

# KEYS: the unacknowledged messages' index and hash (kombu's `unacked_index`, `unacked`),
# then a consumer's queue lists, in the order BRPOP reads them. ARGV: how many; the time;
# then tag, record pairs of messages already handed on, to record first. Pops up to that
# many messages, the first lists first, and records each as unacknowledged as kombu's
# QoS.append does (its tag in the index at that time; in the hash, [message, exchange,
# routing key]), in the same script: a consumer that dies before it has handed them on
# leaves them to be restored like any unacknowledged message. Answers key, message,
# recorded (1, or 0: not a message with a delivery tag, left to kombu), key, message,
# recorded...
_POP_MORE = """
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local want = tonumber(ARGV[1])
local out = {}
for i = 3, #KEYS do
  local got = #out / 3
  if got >= want then break end
  local items = redis.call('RPOP', KEYS[i], want - got)
  if items then
    for _, item in ipairs(items) do
      local ok, m = pcall(cjson.decode, item)
      local recorded = '0'
      if ok and type(m) == 'table' and type(m.properties) == 'table'
          and type(m.properties.delivery_tag) == 'string' then
        local info = m.properties.delivery_info
        if type(info) ~= 'table' then info = {} end
        local tag = m.properties.delivery_tag
        redis.call('ZADD', KEYS[1], ARGV[2], tag)
        redis.call('HSET', KEYS[2], tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange or '') .. ',' .. cjson.encode(info.routing_key or '') .. ']')
        recorded = '1'
      end
      out[#out + 1] = KEYS[i]
      out[#out + 1] = item
      out[#out + 1] = recorded
    end
  end
end
return out
"""


class Channel(redis.Channel):
    QoS = QoS
    do_restore = False
    _shared: tuple[Any, Any] | None = None  # (the pool, a client on it)
    _pop_more: Any = None  # the registered _POP_MORE script

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Delivery tags of messages `_POP_MORE` recorded as unacknowledged, until delivered.
        self._recorded: set[str] = set()
        # While a BRPOP's message is delivered: QoS.append leaves its record to us.
        self._deferring = False
        # Delivered, not yet recorded: delivery tag -> its record (acks come from other threads).
        self._unrecorded: dict[str, str] = {}
        self._unrecorded_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _drop_unrecorded(self, delivery_tag: str) -> bool:
        """An ack (or reject) of a message not recorded yet: it never will be. True if so."""
        with self._unrecorded_lock:
            return self._unrecorded.pop(delivery_tag, None) is not None

    def _take_unrecorded(self) -> list[str]:
        with self._unrecorded_lock:
            items, self._unrecorded = self._unrecorded, {}
        return [x for pair in items.items() for x in pair]

    def _record_unrecorded(self) -> None:
        """Record what was delivered and not yet recorded (`_POP_MORE`, taking none)."""
        pairs = self._take_unrecorded()
        if pairs:
            try:
                self._run_pop_more(0, [], pairs)
            except Exception as exc:  # noqa: BLE001 - as a lost BRPOP reply: the sweeper sends its job again
                log.warning("could not record delivered message(s) as unacknowledged (%s)", exc)

    def _run_pop_more(self, want: int, queues: list[str], pairs: list[str]) -> Any:
        with self.conn_or_acquire() as client:
            if self._pop_more is None:
                self._pop_more = client.register_script(_POP_MORE)
            return self._pop_more(
                keys=[self.unacked_index_key, self.unacked_key, *queues],
                args=[want, time.time(), *pairs],
                client=client,
            )

    def create_publish_batch(self, max_size: int) -> Any:
        commands = getattr(_capture, "commands", None)
        if commands is not None:
            return CapturedBatch(self, max_size, commands)
        return super().create_publish_batch(max_size)

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's, but the message BRPOP brought is handed on before it is recorded as
        unacknowledged; then one script records it and pops the messages behind it."""
        delivered = False
        # (With a global key prefix, kombu's own record: the script does not prefix keys.)
        self._deferring = not self.global_keyprefix
        try:
            delivered = bool(super()._brpop_read(**options))  # raises Empty if none came
        finally:
            self._deferring = False
            if delivered:
                self._deliver_more()
            else:  # its delivery failed: recorded all the same, for it to be restored
                self._record_unrecorded()
        return delivered

    def _deliver_more(self) -> None:
        """Record the message just delivered, then pop and deliver the messages waiting
        behind it, as many as the prefetch allows (see the module's docstring)."""
        want = min(self.qos.can_consume_max_estimate() or 0, POP_MORE_MAX)
        if self.global_keyprefix or not self.active_queues:
            want = 0
        queues = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in self.active_queues] if want else []
        pairs = self._take_unrecorded()
        if not want and not pairs:
            return
        try:
            popped = self._run_pop_more(want, queues, pairs)
        except Exception as exc:  # noqa: BLE001 - the next BRPOP takes them one by one
            log.warning("could not record a message and take more after a BRPOP (%s)", exc)
            return
        for i in range(0, len(popped), 3):
            dest = bytes_to_str(popped[i]).rsplit(self.sep, 1)[0]
            payload = loads(bytes_to_str(popped[i + 1]))
            if popped[i + 2] in (b"1", "1", 1):
                self._recorded.add(payload["properties"]["delivery_tag"])
            self.connection._deliver(payload, dest)

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


class SentinelChannel(Channel, redis.SentinelChannel):
    """This channel, with the primary found through Redis Sentinel (kombu's `sentinel://`
    URLs and `master_name` transport option; see `common.redis_client.broker_settings`)."""


class SentinelTransport(Transport):
    default_port = 26379  # type: ignore[assignment]
    Channel = SentinelChannel
