"""Queue metrics on a real Redis: the snapshot `GET /metrics` renders (api/metrics.py) from
jobs, batch lines and workers written by the real scripts, and the reaper's counters
(`llmq_reaper_actions_total`, `llmq_jobs_ended_total`) moving once per action it takes."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from api.metrics import queue_snapshot
from common import keys
from common.jobs import WorkerInfo
from common.jobstore import JobStore, new_claim_token
from common.reaper import Reaper
from common.settings import Settings
from tests.core.conftest import job

pytestmark = pytest.mark.asyncio


async def register(redis, wid: str, model: str, slots: int, inflight: int, beat: float) -> None:
    info = WorkerInfo(id=wid, model=model, slots=slots, started=0.0, inflight=inflight)
    await redis.set(keys.worker(wid), info.model_dump_json())
    await redis.zadd(keys.WORKERS, {wid: beat})
    await redis.hset(keys.MODELS_SEEN, model, beat)


async def test_the_snapshot_counts_what_the_scripts_wrote(redis):
    store = JobStore(redis, 3600)
    now = time.time()
    await register(redis, "w1@a", "m", slots=4, inflight=1, beat=now)
    await register(redis, "w2@b", "m", slots=6, inflight=2, beat=now)
    await register(redis, "w3@old", "m", slots=8, inflight=8, beat=now - 100)  # not live
    await register(redis, "w4@old", "gone", slots=8, inflight=0, beat=now - 100)  # nothing live or waiting
    await redis.hset(keys.MODELS_SEEN, "q", now - 100)  # no worker, but jobs waiting
    # Interactive jobs: three waiting for m (one of them started, so two), one for q.
    waiting = [job("m"), job("m"), job("m")]
    for record, age in zip(waiting, (40, 5, 0), strict=True):
        await store.create(record)
        await redis.zadd(keys.waiting("m"), {record.id: now - age})  # as if it entered the queue then
    await store.claim(waiting[0].id, "m", "w1@a", new_claim_token(), 30)
    await store.create(job("q"))
    # A batch's lines: three handed out (holding a slot), one of them running.
    lines = [job("m", batch="batch_x") for _ in range(3)]
    for line in lines:
        await store.create(line)
        await redis.sadd(keys.batch_slots("m"), line.id)
    await store.claim(lines[0].id, "m", "w2@b", new_claim_token(), 30)
    # Two active batches: one running with 10 lines (3 handed out), one cancelling.
    await redis.hset(keys.batch("batch_x"), mapping={"status": "in_progress", "n_total": 10, "n_dispatched": 3})
    await redis.hset(keys.batch("batch_y"), mapping={"status": "cancelling", "n_total": 5, "n_dispatched": 1})
    await redis.sadd(keys.ACTIVE_BATCHES, "batch_x", "batch_y")

    snap = await queue_snapshot(redis, worker_ttl_seconds=15)

    assert set(snap.models) == {"m", "q"}
    m, q = snap.models["m"], snap.models["q"]
    assert (m.workers_live, m.slots_capacity, m.slots_in_use) == (2, 10, 3)
    assert (m.waiting_interactive, m.batch_in_flight, m.waiting_batch) == (2, 3, 2)
    assert 5 <= m.oldest_wait_seconds < 30  # the job queued 5 s ago; the 40 s one started
    assert (q.workers_live, q.slots_capacity, q.waiting_interactive) == (0, 0, 1)
    assert snap.batch_lines_pending == 7

    # A line ending frees its slot; a waiting job ending leaves the waiting set.
    await store.cancel(await store.get(lines[1].id))
    await store.cancel(await store.get(waiting[2].id))
    snap = await queue_snapshot(redis, worker_ttl_seconds=15)
    assert (snap.models["m"].batch_in_flight, snap.models["m"].waiting_batch) == (2, 1)
    assert snap.models["m"].waiting_interactive == 1


async def test_an_empty_redis_has_an_empty_snapshot(redis):
    snap = await queue_snapshot(redis, worker_ttl_seconds=15)
    assert snap.models == {} and snap.batch_lines_pending == 0


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Sent:
    async def __call__(self, job_id: str, model: str, priority: int) -> None:
        return None


async def test_the_reaper_counts_each_action_and_each_end_it_writes(redis):
    settings = Settings(reaper_interval_seconds=0.05, queue_resend_seconds=0.01, max_attempts=2)
    store = JobStore(redis, 3600, settings.queue_resend_seconds)
    r = Reaper(store, Sent(), settings)
    await redis.hset(keys.MODELS_SEEN, "metrics-m", time.time())

    def snapshot() -> dict[str, float]:
        return {
            "requeued": counted("llmq_reaper_actions_total", model="metrics-m", action="requeued"),
            "failed": counted("llmq_reaper_actions_total", model="metrics-m", action="failed"),
            "resent": counted("llmq_reaper_actions_total", model="metrics-m", action="resent"),
            "expired": counted("llmq_reaper_actions_total", model="metrics-m", action="expired"),
            "worker_lost": counted("llmq_jobs_ended_total", model="metrics-m", status="failed", code="worker_lost"),
            "queue_timeout": counted("llmq_jobs_ended_total", model="metrics-m", status="failed", code="queue_timeout"),
        }

    def moved(before: dict[str, float]) -> dict[str, float]:
        after = snapshot()
        return {k: after[k] - before[k] for k in before if after[k] != before[k]}

    # A lapsed lease: requeued; lapsed again with its attempts used up: failed (worker_lost).
    record = job("metrics-m")
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    time.sleep(0.02)
    before = snapshot()
    assert await r.reap_lapsed() == [(record.id, "requeued")]
    assert await r.reap_lapsed() == []  # nothing more to do: nothing more counted
    assert moved(before) == {"requeued": 1}
    await store.claim(record.id, record.model, "w2", new_claim_token(), 0.01)
    time.sleep(0.02)
    before = snapshot()
    assert await r.reap_lapsed() == [(record.id, "failed")]
    assert moved(before) == {"failed": 1, "worker_lost": 1}

    # A queued job: its message sent again, then (past its deadline) failed: queue_timeout.
    queued = job("metrics-m")
    await store.create(queued)
    time.sleep(0.02)
    before = snapshot()
    assert await r.sweep_queued() == [(queued.id, "resend")]
    assert moved(before) == {"resent": 1}
    await redis.hset(keys.job(queued.id), "deadline", time.time() - 1)
    await redis.zadd(keys.QUEUED, {queued.id: 0})
    before = snapshot()
    assert await r.sweep_queued() == [(queued.id, "failed")]
    assert moved(before) == {"expired": 1, "queue_timeout": 1}
