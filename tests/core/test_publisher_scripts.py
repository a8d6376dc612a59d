"""The worker's publisher on a real Redis: its pipelines run the job scripts by SHA, so a
Redis that has lost them (restarted, flushed) must get them again, not stall the jobs."""

from __future__ import annotations

import asyncio

from common import keys
from common.jobs import ChoiceDelta
from common.jobstore import JobStore, new_claim_token
from common.schemas import Usage
from worker.publisher import ChunkPublisher

from .conftest import job


async def test_a_redis_that_lost_the_scripts_gets_them_again_and_the_job_ends(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    attempt = await store.claim(record.id, record.model, "w1", new_claim_token(), 60)
    assert attempt == 1
    pub = ChunkPublisher(store, record.model, retry_seconds=0.05)
    pub.begin(record.id, 0)
    task = asyncio.create_task(pub.run())
    try:
        pub.delta(record.id, 1, [ChoiceDelta(index=0, text="a", token_ids=[1])])
        usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        # Wait for the first delta to be in the log, then make Redis forget every script.
        for _ in range(200):
            if await redis.llen(keys.job_log(record.id)) == 1:
                break
            await asyncio.sleep(0.01)
        await redis.script_flush()
        pub.delta(record.id, 1, [ChoiceDelta(index=0, text="b", token_ids=[2])])
        owned = await asyncio.wait_for(
            pub.finish(record.id, 1, "done", usage=usage, fields={"status": "completed"}), 10
        )
    finally:
        task.cancel()
    assert owned is True
    events = await store.log(record.id)
    assert [e.seq for e in events] == [0, 1, 2]
    assert "".join(c.text for e in events for c in e.choices) == "ab"
    assert (await store.get(record.id)).status.value == "completed"
