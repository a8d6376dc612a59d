"""JobReader: every event of a job after a cursor, each once and in order, up to and
including its last (`done` or `error`).

It subscribes to the job's channel first, then replays from the job's log what the
reader has not seen, then follows the channel, dropping what it already delivered and
filling any gap from the log. So a late or reconnecting reader, or one whose events
pub/sub dropped, still gets every event exactly once.

Cursors: `after` is the seq of the last event the reader has (-1: none). A cursor at or
past the end of an ended job yields nothing (the stream just ends); a silent job is
checked every `IDLE_CHECK_SECONDS`, so a reader never waits on a job that is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import redis.asyncio as aioredis

from api.relay import StreamClosed, StreamRelay, Subscription
from common import keys
from common.errors import InvalidRequestError
from common.jobs import ChunkEvent
from common.jobstore import JobStore

# With no event for this long, a reader checks the job still exists and catches up from its log.
IDLE_CHECK_SECONDS = 5.0
# Most events a reader hands on in one batch (one write to its client).
BATCH_EVENTS = 64
# Largest cursor accepted (event ids are list indexes; Redis takes 64-bit signed ones).
MAX_CURSOR = 2**53


def parse_cursor(value: str | int | None, param: str) -> int:
    """A resume cursor from a client: an event id of the stream, or -1 for the start."""
    if value is None:
        return -1
    try:
        cursor = int(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{param} must be an event id from this stream", param=param) from None
    if not -1 <= cursor <= MAX_CURSOR:
        raise InvalidRequestError(f"{param} must be an event id from this stream (0 or more)", param=param)
    return cursor


class JobReader:
    def __init__(self, redis: aioredis.Redis, store: JobStore, relay: StreamRelay):
        self.redis = redis
        self.store = store
        self.relay = relay

    async def follow(
        self, job_id: str, after: int = -1, subscription: Subscription | None = None
    ) -> AsyncIterator[ChunkEvent]:
        async for batch in self.follow_batches(job_id, after, subscription):
            for event in batch:
                yield event

    async def follow_batches(
        self, job_id: str, after: int = -1, subscription: Subscription | None = None
    ) -> AsyncIterator[list[ChunkEvent]]:
        """`follow`, in batches: the events that were ready together (a catch-up from the
        log, or what the channel delivered while the reader was busy), so a reader that
        fell behind writes them to its client at once. Never an empty batch."""
        channel = keys.job_channel(job_id)
        sub = subscription or await self.relay.subscribe(channel)
        next_seq = after + 1
        # A job subscribed to before it was queued (the caller's `subscription`, from the
        # start) has nothing in its log the channel will not carry: the first read of the
        # log is skipped (a gap, an interruption or a silence reads it, as always).
        read_log = subscription is None or after >= 0
        try:
            while True:
                # Catch up from the replay log.
                caught_up = await self.store.log(job_id, next_seq) if read_log else []
                read_log = True
                if caught_up:
                    end = next((i for i, e in enumerate(caught_up) if e.kind != "delta"), None)
                    if end is not None:
                        yield caught_up[: end + 1]
                        return
                    yield caught_up
                    next_seq = caught_up[-1].seq + 1
                # (An empty read from seq 0 is an empty log: nothing has ended. This skips a
                # round trip at the start of every new stream.)
                if not caught_up and next_seq > 0 and await self._ended_before(job_id, next_seq):
                    return
                # Then follow the channel until it has nothing (gap, interruption, silence).
                while True:
                    try:
                        # asyncio.timeout, not wait_for: no extra task per event on the token path.
                        async with asyncio.timeout(IDLE_CHECK_SECONDS):
                            first = await sub.get()
                    except TimeoutError:
                        if not await self.redis.exists(keys.job(job_id)):
                            raise StreamClosed(
                                "the job no longer exists (expired, or Redis lost it)", code="job_lost"
                            ) from None
                        break
                    except StreamClosed as exc:
                        if exc.code == "slow_consumer":
                            raise
                        # The shared connection dropped: listen again, then catch up from the log.
                        sub = await self.relay.subscribe(channel)
                        if not await self.redis.exists(keys.job(job_id)):
                            raise StreamClosed(
                                "the stream was cut: Redis lost the job", code="stream_interrupted"
                            ) from exc
                        break
                    batch: list[ChunkEvent] = []
                    gap = ended = False
                    for event in [first, *sub.ready(BATCH_EVENTS)]:
                        if event.seq < next_seq:
                            if event.kind != "delta":
                                ended = True  # the end, which the reader's cursor is already past
                                break
                            continue
                        if event.seq > next_seq:
                            gap = True  # missed some: the log has them (what is after, too)
                            break
                        batch.append(event)
                        next_seq += 1
                        if event.kind != "delta":
                            ended = True
                            break
                    if batch:
                        yield batch
                    if ended:
                        return
                    if gap:
                        break
        finally:
            with anyio.CancelScope(shield=True):
                await self.relay.unsubscribe(sub)

    async def _ended_before(self, job_id: str, next_seq: int) -> bool:
        """Whether the job's log ends (with its last event) before `next_seq`."""
        raw = await self.redis.lindex(keys.job_log(job_id), -1)
        if raw is None:
            return False
        last = ChunkEvent.decode(raw)
        return last.kind != "delta" and last.seq < next_seq
