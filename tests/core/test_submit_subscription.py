"""`JobPipeline.submit` on a real Redis and a real StreamRelay: a followed job's channel is
subscribed while its record is written (not before it, one round trip after the other),
and its message is never sent before Redis has the subscription, so no worker can publish
an event its reader misses; a refused job leaves no subscription behind."""

from __future__ import annotations

import asyncio

import pytest

from api.admission import Admission
from api.jobs.pipeline import JobPipeline
from api.relay import StreamRelay
from common import keys
from common.errors import RateLimitError
from common.jobs import JobOptions
from common.settings import Settings

from .conftest import job

pytestmark = pytest.mark.asyncio


class RecordingQueue:
    """Notes, as each message is sent, whether Redis already has the job's record and the
    subscription to its channel."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.sent: dict[str, tuple[bool, int]] = {}

    async def submit(self, job_id: str, model: str, priority: int = keys.CHAT_PRIORITY) -> None:
        await self.submit_many([job_id], model, priority)

    async def submit_many(self, job_ids: list[str], model: str, priority: int = keys.CHAT_PRIORITY) -> None:
        for job_id in job_ids:
            exists = bool(await self.redis.exists(keys.job(job_id)))
            numsub = dict(await self.redis.pubsub_numsub(keys.job_channel(job_id)))
            self.sent[job_id] = (exists, int(numsub.get(keys.job_channel(job_id).encode(), 0)))


@pytest.fixture
async def relay(redis_url):
    r = StreamRelay(redis_url, buffer_events=8)
    await r.start()
    yield r
    await r.stop()


def pipeline(redis, relay, **settings) -> tuple[JobPipeline, RecordingQueue]:
    s = Settings(**({"max_queued_jobs": 100} | settings))
    queue = RecordingQueue(redis)

    async def no_slots(model: str) -> int:
        return 0

    return JobPipeline(s, redis, relay, queue, Admission(s, redis, no_slots)), queue  # type: ignore[arg-type]


async def test_the_message_goes_out_only_once_the_channel_is_subscribed(redis, relay):
    p, queue = pipeline(redis, relay)
    # Subscriptions slower than the record's write: the write does not wait for them, the
    # message waits for both.
    subscribe, written_while_subscribing = relay.subscribe, []

    async def slow_subscribe(channel, timeout=5.0):
        await asyncio.sleep(0.05)
        written_while_subscribing.append(bool(await redis.exists(keys.job(channel.rsplit(":", 1)[-1]))))
        return await subscribe(channel, timeout)

    relay.subscribe = slow_subscribe  # type: ignore[method-assign]
    records = [job(options=JobOptions(stream=True)) for _ in range(5)]
    subs = await asyncio.gather(*(p.submit(r, follow=True) for r in records))
    assert written_while_subscribing == [True] * 5
    assert {r.id: queue.sent[r.id] for r in records} == {r.id: (True, 1) for r in records}
    # And the reader gets what a worker publishes.
    assert all(s is not None for s in subs)
    assert keys.job_channel(records[0].id) == subs[0].channel  # type: ignore[union-attr]


async def test_a_refused_job_leaves_no_subscription(redis, relay):
    p, queue = pipeline(redis, relay, max_concurrent_jobs_per_key=1)
    first = job(owner="k", options=JobOptions(stream=True))
    await p.submit(first, follow=True)
    refused = job(owner="k", options=JobOptions(stream=True))
    with pytest.raises(RateLimitError):
        await p.submit(refused, follow=True)
    assert refused.id not in queue.sent and not await redis.exists(keys.job(refused.id))
    for _ in range(100):
        channels = {c.decode() for c in await redis.pubsub_channels(keys.job_channel("*"))}
        if keys.job_channel(refused.id) not in channels:
            break
        await asyncio.sleep(0.02)
    assert channels == {keys.job_channel(first.id)}
    assert relay.open_streams == 1


async def test_submits_keep_the_waiting_count_for_the_look(redis, relay):
    """The admission script answers the model's waiting jobs; `submit` keeps that count,
    so `look` needs no round trip of its own while the queue is far from full, and reads
    again once a submit has seen it fill (MAX_QUEUED_JOBS 4 here)."""
    p, _ = pipeline(redis, relay, max_queued_jobs=4)
    for n in (1, 2, 3, 4):
        await p.submit(job(), follow=False)
        assert p._looked["m"] == (n, 4)
    with pytest.raises(RateLimitError):
        await p.submit(job(), follow=False)
    assert p._looked["m"] == (4, 4)
    with pytest.raises(RateLimitError):
        await p.look("m")  # at the limit: read, and refused before validation
