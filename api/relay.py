"""StreamRelay: one Redis pub/sub connection per API process, fanned out to every open stream.

Each stream subscribes to its job's channel on the shared connection and gets a bounded
in-process queue. `subscribe` returns only once Redis has confirmed the subscription, so
a job queued afterwards cannot publish before we listen. Ordering, gaps and catching up
from the replay log are the reader's business (`api.jobs.reader.JobReader`). A stream whose client stops
reading fills its own queue and is cut off; it never backs up the shared connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import keys, timing
from common.errors import ServiceError, ServiceUnavailableError
from common.jobs import ChunkEvent
from common.redis_client import client
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class StreamClosed(ServiceError):
    """The relay could not deliver a stream's events (slow client, lost connection)."""

    status_code = 503
    error_type = "server_error"


class Subscription:
    def __init__(self, channel: str, maxsize: int):
        self.channel = channel
        self._queue: asyncio.Queue[ChunkEvent | StreamClosed] = asyncio.Queue(maxsize)
        self.closed = False
        # The end of the stream, met by `ready` behind the events before it: raised by
        # the next `get`.
        self._held: StreamClosed | None = None

    def _deliver(self, event: ChunkEvent) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._close(StreamClosed("client is not reading fast enough; stream cut off", code="slow_consumer"))

    def _close(self, error: StreamClosed, keep_buffered: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if keep_buffered and not self._queue.full():
            self._queue.put_nowait(error)
            return
        # Drop what is buffered: the error must get through, and the client is stuck.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(error)

    async def get(self) -> ChunkEvent:
        if self._held is not None:
            raise self._held
        item = await self._queue.get()
        if isinstance(item, StreamClosed):
            raise item
        return item

    def ready(self, limit: int) -> list[ChunkEvent]:
        """Up to `limit` events already delivered, without waiting (a reader that fell
        behind sends them to its client in one write)."""
        out: list[ChunkEvent] = []
        while len(out) < limit and self._held is None and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, StreamClosed):
                self._held = item
            else:
                out.append(item)
        return out


class StreamRelay:
    def __init__(self, redis_url: str, buffer_events: int):
        self.redis_url = redis_url
        self.buffer_events = buffer_events
        self._subs: dict[str, set[Subscription]] = {}
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._redis: aioredis.Redis | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Keeps the connection subscribed (so reads block) even with no open stream.
        self._home = f"{keys.PREFIX}relay:{uuid.uuid4().hex}"
        # Other channels this process listens to on the same connection (one subscriber
        # connection per API process): each message calls its callback, and so does every
        # reconnection (messages may have been missed).
        self._listeners: dict[str, Callable[[], None]] = {}
        # Channels to (un)subscribe, sent together in one SUBSCRIBE and one UNSUBSCRIBE
        # by `_flush` (the streams that start or end in one turn of the event loop: a
        # command each was about 4% of the API's CPU under load, issue 12).
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None

    def listen(self, channel: str, callback: Callable[[], None]) -> None:
        """Call `callback` on each message on `channel` (from the next (re)connection on:
        call it before `start`)."""
        self._listeners[channel] = callback

    @property
    def open_streams(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    async def start(self) -> None:
        self._redis = client(self.redis_url)
        self._task = asyncio.create_task(self._run(), name="stream-relay")

    async def stop(self) -> None:
        await cancel_and_wait(t for t in (self._flusher, self._task) if t is not None)
        if self._redis is not None:
            await self._redis.aclose()

    async def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        """A new reader of `channel`; several readers of one channel share its subscription."""
        # (asyncio.timeout, not wait_for: on Python 3.11 wait_for made a task each time,
        # and swallowed a cancellation that came as the wait ended.)
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError as exc:
                raise ServiceUnavailableError("cannot reach Redis") from exc
        assert self._pubsub is not None
        sub = Subscription(channel, self.buffer_events)
        readers = self._subs.setdefault(channel, set())
        first = not readers
        readers.add(sub)
        confirmed = self._confirm.get(channel)
        if confirmed is None and not first:
            return sub  # the channel is already subscribed
        try:
            if confirmed is None:
                confirmed = asyncio.get_running_loop().create_future()
                self._confirm[channel] = confirmed
                self._to_unsubscribe.discard(channel)
                self._to_subscribe.add(channel)
                self._kick()
            async with asyncio.timeout(timeout):
                await asyncio.shield(confirmed)
        except (RedisError, OSError, TimeoutError) as exc:
            self._drop(sub)
            raise ServiceUnavailableError("cannot subscribe to the job's stream") from exc
        except asyncio.CancelledError:
            # The caller went away while the channel was being subscribed (a client that
            # left just as its stream resumed): its reader goes, and with the channel's
            # last reader the channel, as `unsubscribe` does. Before, both stayed for good:
            # the reader listed as an open stream, the channel subscribed.
            if self._leave(sub) and confirmed is not None and not confirmed.done():
                confirmed.cancel()  # no one else waits for it: they would be readers
            raise
        finally:
            if confirmed is not None and confirmed.done():
                self._confirm.pop(channel, None)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        self._leave(sub)

    def _leave(self, sub: Subscription) -> bool:
        """Forget a reader, and with its channel's last reader the channel (a subscription
        still pending is dropped). True if it was the last."""
        if not self._drop(sub):
            return False
        self._to_subscribe.discard(sub.channel)
        if self._pubsub is not None:
            self._to_unsubscribe.add(sub.channel)
            self._kick()
        return True

    def _kick(self) -> None:
        """Send the pending (un)subscriptions from the next turn of the event loop on."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="stream-relay-subscriptions")

    async def _flush(self) -> None:
        while self._to_subscribe or self._to_unsubscribe:
            pubsub = self._pubsub
            leaving, self._to_unsubscribe = self._to_unsubscribe, set()
            joining, self._to_subscribe = self._to_subscribe, set()
            if leaving and pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.unsubscribe(*leaving)
            if joining:
                try:
                    if pubsub is None:
                        raise ConnectionError("not connected to Redis")
                    await pubsub.subscribe(*joining)
                except (RedisError, OSError) as exc:
                    # Each waiting `subscribe` fails with it (a 503 for its request).
                    for channel in joining:
                        fut = self._confirm.get(channel)
                        if fut is not None and not fut.done():
                            fut.set_exception(exc)

    def _drop(self, sub: Subscription) -> bool:
        """Forget a reader; True if it was its channel's last."""
        sub.closed = True
        readers = self._subs.get(sub.channel)
        if readers is None or sub not in readers:
            return False
        readers.discard(sub)
        if readers:
            return False
        del self._subs[sub.channel]
        return True

    async def _run(self) -> None:
        assert self._redis is not None
        while True:
            try:
                self._pubsub = self._redis.pubsub()
                await self._pubsub.subscribe(self._home, *self._listeners)
                self._ready.set()
                for callback in self._listeners.values():
                    callback()
                await self._read(self._pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("stream relay lost Redis (%s); reconnecting", exc)
            except Exception:
                log.exception("stream relay failed; restarting")
            self._ready.clear()
            # Whatever was in flight on the old connection may be lost: tell every reader
            # (they resubscribe and catch up from the replay log, if Redis still has it).
            for readers in list(self._subs.values()):
                for sub in readers:
                    lost = StreamClosed("lost the connection to Redis mid-stream", code="stream_interrupted")
                    sub._close(lost, keep_buffered=True)
            self._subs.clear()
            # A new connection starts with no subscription.
            self._to_subscribe.clear()
            self._to_unsubscribe.clear()
            for fut in self._confirm.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("lost the connection to Redis"))
            self._confirm.clear()
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[union-attr]
            await asyncio.sleep(0.5)

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        """Read the subscriber connection until it fails. A published message (nearly every
        reply: a token of some stream) goes straight to its readers; anything else
        (subscribe and unsubscribe confirmations) through redis-py's PubSub, which keeps
        its channel lists by them. Not `get_message`: redis-py's per-message layers (a
        health check, a retry wrapper, observability hooks) and its read timeout (a timer
        scheduled and cancelled each message) cost 15 us a message against 5 us (issue
        12: the relay reads a message per token per stream). No read timeout: the relay's
        connection has no health checks for one to serve, and a lost connection fails
        the read (then every reader is told and catches up from the replay log, rather
        than a reconnection behind its back dropping what was published meanwhile)."""
        conn = pubsub.connection
        assert conn is not None
        while True:
            # push_request: pub/sub replies are RESP3 pushes (hiredis.PushNotification, a list).
            response = await conn.read_response(timeout=math.inf, disconnect_on_error=False, push_request=True)
            if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                self._message(response[1], response[2])
                continue
            message = await pubsub.handle_message(response)
            if message is not None:
                self._dispatch(message)

    def _message(self, channel_raw: bytes | str, data: bytes | str) -> None:
        channel = channel_raw.decode() if isinstance(channel_raw, bytes) else channel_raw
        listener = self._listeners.get(channel)
        if listener is not None:
            listener()
            return
        readers = self._subs.get(channel)
        if not readers:
            return
        try:
            event = ChunkEvent.decode(data)
        except ValueError:
            log.error("undecodable event on %s", channel)
            return
        if timing.ENABLED and event.seq == 0:
            timing.stamp(timing.job_of_channel(channel), "relayed")
        for sub in list(readers):
            sub._deliver(event)
            if sub.closed:
                # Cut off (slow consumer): with the channel's last reader, stop listening now.
                self._leave(sub)

    def _dispatch(self, message: dict) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        kind = message["type"]
        if kind == "message":
            self._message(channel, message["data"])
        elif kind == "subscribe":
            fut = self._confirm.get(channel)
            if fut is not None and not fut.done():
                fut.set_result(None)
