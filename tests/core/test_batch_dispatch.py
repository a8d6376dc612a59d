"""The batch runner's group hand-out on a real Redis: a group's slots reserved in one
script call (in order, never past capacity, the same when run again), and a group's job
records written in one round trip (`JobStore.create_lines`), also after Redis lost its
scripts."""

from __future__ import annotations

import pytest

from api.batches.runner import _RESERVE
from common import keys
from common.jobs import JobStatus
from common.jobstore import JobStore
from tests.core.conftest import job

pytestmark = pytest.mark.asyncio
SLOTS = keys.batch_slots("m")


async def reserve(redis, capacity: int, *ids: str) -> int:
    return int(await redis.register_script(_RESERVE)(keys=[SLOTS], args=[capacity, *ids]))


async def held(redis) -> set[str]:
    return {keys.text(j) for j in await redis.smembers(SLOTS)}


async def test_a_group_takes_the_free_slots_in_order_and_no_more(redis):
    assert await reserve(redis, 3, "a", "b", "c", "d", "e") == 3
    assert await held(redis) == {"a", "b", "c"}
    # Run again (a retried call, or the group handed out again after a restart): the same.
    assert await reserve(redis, 3, "a", "b", "c", "d", "e") == 3
    assert await held(redis) == {"a", "b", "c"}
    # A line that ended freed its slot: the next line in order takes it, the one after waits.
    await redis.srem(SLOTS, "b")
    assert await reserve(redis, 3, "d", "e") == 1
    assert await held(redis) == {"a", "c", "d"}
    # It stops at the first line without a slot, even if a later one holds one already.
    assert await reserve(redis, 3, "x", "a") == 0
    assert await held(redis) == {"a", "c", "d"}


async def test_slots_are_shared_by_every_group_against_one_capacity(redis):
    assert await reserve(redis, 4, "b1-0", "b1-1", "b1-2") == 3
    assert await reserve(redis, 4, "b2-0", "b2-1") == 1
    assert len(await held(redis)) == 4


async def test_create_lines_writes_a_group_once(redis):
    store = JobStore(redis, 3600)
    queued = [job(batch="batch_x") for _ in range(3)]
    failed = job(batch="batch_x", status=JobStatus.failed)
    group = [queued[0], failed, *queued[1:]]
    assert await store.create_lines(group) == [1, 1, 1, 1]
    for record in group:
        stored = await store.get(record.id)
        assert stored is not None and stored.status == record.status and stored.batch == "batch_x"
    # Queued lines are in the sweeper's index (a lost message is sent again); a batch's
    # lines never count as interactive jobs waiting for the model.
    assert {keys.text(j) for j in await redis.zrange(keys.QUEUED, 0, -1)} == {r.id for r in queued}
    assert await redis.zcard(keys.waiting("m")) == 0
    # Handed out again (a restart): nothing is written over, a record that moved on stays.
    await redis.hset(keys.job(queued[0].id), "status", "in_progress")
    assert await store.create_lines(group) == [0, 0, 0, 0]
    assert await store.status(queued[0].id) == JobStatus.in_progress


async def test_create_lines_after_redis_lost_its_scripts(redis):
    store = JobStore(redis, 3600)
    assert await store.create_lines([job(batch="batch_x")]) == [1]
    await redis.script_flush()
    group = [job(batch="batch_x"), job(batch="batch_x")]
    assert await store.create_lines(group) == [1, 1]
    assert all([await store.get(r.id) for r in group])
