"""Reapers in several processes (every API process and every worker runs one) on a real
Redis: a sweep that takes longer than the reaper's interval is not overlapped by another
process's sweep, which would reap the same lapsed job again (its `reap` answers a second
caller as it answered the first: requeued, so the job's message was sent twice and the
requeue counted twice, as seen with two API processes on a loaded machine)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from common.jobstore import JobStore, new_claim_token
from common.metrics import REAPER_ACTIONS
from common.reaper import Reaper
from common.settings import Settings
from tests.core.conftest import job
from tests.core.test_reaper import Sent

pytestmark = pytest.mark.asyncio


def reaper(redis) -> tuple[Reaper, Sent, JobStore]:
    """A reaper sweeping every 0.05 s that resends no queued job (only requeues count here)."""
    settings = Settings(reaper_interval_seconds=0.05, queue_resend_seconds=3600, max_attempts=3)
    store = JobStore(redis, 3600, settings.queue_resend_seconds)
    sent = Sent()
    return Reaper(store, sent, settings), sent, store


async def test_a_slow_sweep_is_not_overlapped_by_another_processs_reaper(redis):
    slow, sent_slow, store_slow = reaper(redis)
    fast, sent_fast, _ = reaper(redis)
    record = job()
    await store_slow.create(record)
    await store_slow.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    time.sleep(0.02)  # its lease lapsed
    read = store_slow.get

    async def slow_get(job_id: str):  # a loaded process: the sweep outlasts the interval (0.05 s)
        await asyncio.sleep(0.3)
        return await read(job_id)

    store_slow.get = slow_get  # type: ignore[method-assign]
    requeued = REAPER_ACTIONS.labels(record.model, "requeued")
    before = requeued._value.get()
    first = asyncio.create_task(slow.run())
    await asyncio.sleep(0.01)  # the slow one holds the lock and is mid-sweep
    second = asyncio.create_task(fast.run())
    await asyncio.sleep(0.6)
    for task in (first, second):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sent_slow.calls + sent_fast.calls == [(record.id, "m", 0)]
    assert requeued._value.get() - before == 1


async def test_a_sweep_longer_than_its_lock_renews_it(redis, monkeypatch):
    """A sweep of many jobs on a loaded process outlasts SWEEP_LOCK_SECONDS: it renews the
    lock as it goes, so another process's reaper still cannot start a sweep beside it."""
    from common import reaper as reaper_module

    monkeypatch.setattr(reaper_module, "SWEEP_LOCK_SECONDS", 0.4)
    slow, sent_slow, store_slow = reaper(redis)
    slow._lock.timeout = 0.4
    fast, sent_fast, _ = reaper(redis)
    fast._lock.timeout = 0.4
    records = [job() for _ in range(6)]
    for record in records:
        await store_slow.create(record)
        await store_slow.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    time.sleep(0.02)  # their leases lapsed
    read = store_slow.get

    async def slow_get(job_id: str):  # 0.2 s a job: 1.2 s in all, three times the lock's time
        await asyncio.sleep(0.2)
        return await read(job_id)

    store_slow.get = slow_get  # type: ignore[method-assign]
    first = asyncio.create_task(slow.run())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(fast.run())
    await asyncio.sleep(1.5)
    for task in (first, second):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sorted(sent_slow.calls) == sorted((r.id, "m", 0) for r in records)
    assert sent_fast.calls == []
