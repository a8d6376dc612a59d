"""JobReader on a real Redis, with the API's StreamRelay: the log and the live channel
merged into each event once and in order, and cursors at or past a job's end."""

from __future__ import annotations

import asyncio

import pytest

from api.jobs.reader import JobReader
from api.relay import StreamRelay
from common import keys
from common.jobs import ChoiceDelta, ChunkEvent
from common.jobstore import JobStore, new_claim_token
from tests.core.conftest import job

pytestmark = pytest.mark.asyncio


def delta(seq: int, text: str) -> str:
    return ChunkEvent(seq=seq, kind="delta", choices=[ChoiceDelta(index=0, text=text, token_ids=[seq])]).encode()


def done(seq: int) -> str:
    return ChunkEvent(seq=seq, kind="done", choices=[ChoiceDelta(index=0, finish_reason="stop")]).encode()


@pytest.fixture
async def reader(redis, redis_url):
    relay = StreamRelay(redis_url, buffer_events=64)
    await relay.start()
    store = JobStore(redis, 3600)
    yield JobReader(redis, store, relay), store
    await relay.stop()


async def running_job(store: JobStore):
    record = job()
    await store.create(record)
    assert await store.claim(record.id, record.model, "w", new_claim_token(), 3600) == 1
    return record


async def collect(reader: JobReader, job_id: str, after: int = -1) -> list[ChunkEvent]:
    return [e async for e in reader.follow(job_id, after)]


async def test_log_and_channel_merge_each_event_once_in_order(reader, redis):
    r, store = reader
    record = await running_job(store)
    await store.append(record.id, 1, 0, [delta(0, "a"), delta(1, "b")])
    following = asyncio.create_task(collect(r, record.id))
    await asyncio.sleep(0.2)  # caught up from the log; now on the channel
    await redis.publish(keys.job_channel(record.id), delta(1, "b"))  # a repeat
    await redis.rpush(keys.job_log(record.id), delta(2, "c"))  # logged, never published
    await store.append(record.id, 1, 3, [delta(3, "d")])
    await store.append(record.id, 1, 4, [done(4)])
    events = await asyncio.wait_for(following, 10)
    assert [e.seq for e in events] == [0, 1, 2, 3, 4]
    assert "".join(c.text for e in events for c in e.choices) == "abcd"


async def test_a_cursor_at_or_past_the_end_of_an_ended_job_yields_nothing(reader):
    r, store = reader
    record = await running_job(store)
    await store.append(record.id, 1, 0, [delta(0, "a"), done(1)])
    assert [e.seq for e in await collect(r, record.id, 0)] == [1]
    for after in (1, 2, 10_000):
        assert await asyncio.wait_for(collect(r, record.id, after), 2) == []


async def test_a_cursor_ahead_of_a_running_job_ends_with_the_job(reader):
    r, store = reader
    record = await running_job(store)
    await store.append(record.id, 1, 0, [delta(0, "a")])
    following = asyncio.create_task(collect(r, record.id, 50))
    await asyncio.sleep(0.2)
    await store.append(record.id, 1, 1, [delta(1, "b"), done(2)])
    assert await asyncio.wait_for(following, 10) == []


async def test_a_fresh_subscription_batches_what_is_ready_and_fills_a_gap_from_the_log(reader, redis):
    """A job subscribed to before it was queued skips the first read of its log; events
    the channel delivered while the reader was busy come in one batch, and a gap among
    them (pub/sub lost one) is filled from the log, each event once and in order."""
    r, store = reader
    record = await running_job(store)
    sub = await r.relay.subscribe(keys.job_channel(record.id))
    await store.append(record.id, 1, 0, [delta(0, "a"), delta(1, "b")])
    await redis.rpush(keys.job_log(record.id), delta(2, "c"))  # logged, never published
    await store.append(record.id, 1, 3, [delta(3, "d"), done(4)])
    await asyncio.sleep(0.2)  # all of it delivered to the subscription before reading
    batches = await asyncio.wait_for(_batches(r, record.id, sub), 10)
    assert [[e.seq for e in b] for b in batches] == [[0, 1], [2, 3, 4]]
    assert "".join(c.text for b in batches for e in b for c in e.choices) == "abcd"


async def _batches(reader: JobReader, job_id: str, sub) -> list[list[ChunkEvent]]:
    return [b async for b in reader.follow_batches(job_id, -1, sub)]
