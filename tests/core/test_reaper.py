"""The reaper on a real Redis: lapsed leases, queued jobs whose message may be gone, and
deadlines for jobs no worker takes."""

from __future__ import annotations

import time

import pytest

from common import keys
from common.jobstore import JobStore, new_claim_token
from common.reaper import Reaper
from common.settings import Settings
from tests.core.conftest import job

pytestmark = pytest.mark.asyncio


class Sent:
    def __init__(self):
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(self, job_id: str, model: str, priority: int) -> None:
        self.calls.append((job_id, model, priority))


def reaper(redis, **overrides) -> tuple[Reaper, Sent, JobStore]:
    settings = Settings(reaper_interval_seconds=0.05, queue_resend_seconds=0.01, **overrides)
    store = JobStore(redis, 3600, settings.queue_resend_seconds)
    sent = Sent()
    return Reaper(store, sent, settings), sent, store


async def test_a_lapsed_lease_goes_back_to_the_queue_whatever_the_heartbeat(redis):
    r, sent, store = reaper(redis, max_attempts=2)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    # The worker still beats (e.g. a second process under the same name): leases decide.
    await redis.zadd(keys.WORKERS, {"w1": time.time()})
    time.sleep(0.02)
    assert await r.reap_lapsed() == [(record.id, "requeued")]
    assert sent.calls == [(record.id, "m", keys.CHAT_PRIORITY)]
    await store.claim(record.id, record.model, "w2", new_claim_token(), 0.01)
    time.sleep(0.02)
    assert await r.reap_lapsed() == [(record.id, "failed")]  # attempts used up
    assert (await store.log(record.id))[-1].error["code"] == "worker_lost"


async def test_a_queued_job_without_a_message_is_sent_again(redis):
    r, sent, store = reaper(redis)
    record = job(batch="batch_b")
    await store.create(record)  # written, but its message was never sent
    time.sleep(0.02)
    assert await r.sweep_queued() == [(record.id, "resend")]
    assert sent.calls == [(record.id, "m", keys.BATCH_PRIORITY)]
    # Once claimed, it is no longer the sweeper's.
    await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    time.sleep(0.02)
    assert await r.sweep_queued() == []


async def test_a_job_past_its_deadline_fails_with_queue_timeout(redis):
    r, sent, store = reaper(redis)
    await redis.hset(keys.MODELS_SEEN, "m", time.time())
    record = job(deadline=time.time() - 1)
    await store.create(record)
    time.sleep(0.02)
    assert await r.sweep_queued() == [(record.id, "failed")]
    events = await store.log(record.id)
    assert [e.kind for e in events] == ["error"] and events[0].error["code"] == "queue_timeout"
    assert sent.calls == []


async def test_a_job_of_a_model_without_workers_fails_with_model_unavailable(redis):
    r, sent, store = reaper(redis, no_worker_timeout_seconds=0.01)
    await redis.hset(keys.MODELS_SEEN, "m", time.time() - 60)  # its last worker beat a minute ago
    record = job()
    await store.create(record)
    time.sleep(0.02)
    assert await r.sweep_queued() == [(record.id, "failed")]
    assert (await store.get(record.id)).error["code"] == "model_unavailable"
    # While a worker serves the model, a queued job just waits (and is sent again).
    # A batch's line waits for its batch's window instead.
    line = job(batch="batch_w", deadline=time.time() + 3600)
    await store.create(line)
    time.sleep(0.02)
    assert await r.sweep_queued() == [(line.id, "resend")]
    # While a worker serves the model, a queued job just waits (and is sent again).
    r.settings.no_worker_timeout_seconds = 30
    await redis.hset(keys.MODELS_SEEN, "m", time.time())
    other = job()
    await store.create(other)
    time.sleep(0.02)
    assert (other.id, "resend") in await r.sweep_queued()


async def test_one_sweep_per_interval_across_processes(redis):
    a, _, _ = reaper(redis)
    b, _, _ = reaper(redis)
    assert await a._lock.acquire(token=None) is True
    assert await b._lock.acquire(token=None) is False
