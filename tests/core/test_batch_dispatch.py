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
    return int(await redis.register_script(_RESERVE)(keys=[SLOTS, keys.BATCH_SLOT_SETS], args=[capacity, *ids]))


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


# -- a group half handed out (review of issue 12) -------------------------------------

CHAT = "/v1/chat/completions"


class FakeQueue:
    def __init__(self):
        self.sent: list[str] = []
        self.messages: list[list[str]] = []

    async def submit_many(self, job_ids, model, priority):
        self.sent += job_ids
        self.messages += [[j] for j in job_ids]

    async def submit_groups(self, groups, model, priority):
        for group in groups:
            self.sent += group
            self.messages.append(list(group))


class FakePipeline:
    def __init__(self, store):
        self.store = store
        self.queue = FakeQueue()
        self.cancelled: list[str] = []

    async def cancel(self, job_id, quiet=False, source=None):
        self.cancelled.append(job_id)
        return "queued"


def runner_on(redis):
    from types import SimpleNamespace

    from api.batches.runner import _RAISE_HANDING, _RESERVE, BatchRunner

    runner = object.__new__(BatchRunner)
    runner.redis = redis
    runner.pipeline = FakePipeline(JobStore(redis, 3600))
    runner.settings = SimpleNamespace(job_ttl_seconds=3600, worker_ttl_seconds=30, batch_slot_share=0.75)
    runner._capacities = {}
    runner._raise_handing = redis.register_script(_RAISE_HANDING)
    runner._reserve = redis.register_script(_RESERVE)
    runner._slot_sets_seeded = False
    return runner


def lines_of(batch_id: str, n: int, failed: set[int] = frozenset()):
    from api.batches.input import line_job_id

    records = []
    for i in range(n):
        record = job(batch=batch_id, status=JobStatus.failed if i in failed else JobStatus.queued)
        record.id = line_job_id(batch_id, CHAT, i)
        records.append(record)
    return records


async def test_a_stop_covers_a_group_whose_records_were_written_but_not_marked_handed_out(redis):
    """The process died (or a send failed) after a group's records were written and before
    `n_dispatched` moved past it: a cancel must cancel those lines too and count them,
    or they run after the batch has ended."""
    from types import SimpleNamespace

    runner = runner_on(redis)
    batch = SimpleNamespace(id="batch_half", endpoint=CHAT)
    records = lines_of(batch.id, 4, failed={2})
    await runner.pipeline.store.create_lines(records)
    # Line 0 handed out whole; lines 1-3 written as a group, the mark raised before them.
    await redis.hset(keys.batch(batch.id), mapping={"n_dispatched": 1, "n_handing": 4})
    counters = {"total": 6, "completed": 0, "failed": 0, "cancelled": 0, "dispatched": 1, "handing": 4}
    await runner._stop_lines(batch, counters)
    assert counters["dispatched"] == 4 and int(await redis.hget(keys.batch(batch.id), "n_dispatched")) == 4
    assert runner.pipeline.cancelled == [records[0].id, records[1].id, records[3].id]
    # The invalid line's end counts (its record was written failed; its SADD was not).
    assert await redis.smembers(keys.batch_ended(batch.id, "failed")) == {records[2].id.encode()}


async def test_a_stop_past_a_group_that_was_never_written_waits_for_nothing(redis):
    from types import SimpleNamespace

    runner = runner_on(redis)
    batch = SimpleNamespace(id="batch_unwritten", endpoint=CHAT)
    await runner.pipeline.store.create_lines(lines_of(batch.id, 1))
    await redis.hset(keys.batch(batch.id), mapping={"n_dispatched": 1, "n_handing": 5})
    counters = {"total": 5, "completed": 0, "failed": 0, "cancelled": 0, "dispatched": 1, "handing": 5}
    await runner._stop_lines(batch, counters)
    assert counters["dispatched"] == 1


async def test_a_line_handed_out_again_whose_preparation_failed_counts_as_its_record_says(redis):
    """After a restart a line already running is prepared again and fails for a passing
    reason (no live worker at that moment): it is not counted failed while it runs."""
    from api.batches.runner import _Line
    from common.errors import ServiceUnavailableError

    runner = runner_on(redis)
    batch_id = "batch_again"
    (running,) = lines_of(batch_id, 1)
    await runner.pipeline.store.create_lines([running])
    await redis.hset(keys.job(running.id), "status", "in_progress")
    (again,) = lines_of(batch_id, 1, failed={0})
    await runner._hand_out(
        type("B", (), {"id": batch_id})(), [_Line(0, again, ServiceUnavailableError("no live worker"))]
    )
    assert await redis.scard(keys.batch_ended(batch_id, "failed")) == 0
    assert runner.pipeline.queue.sent == []
    assert int(await redis.hget(keys.batch(batch_id), "n_dispatched")) == 1


async def test_a_slot_whose_record_is_not_written_yet_is_not_freed_at_once(redis):
    """A runner reserves a group's slots a moment before it writes their records: a prune
    in between must not free them (the batch would run past its share). A slot whose line
    ended is freed at once; one whose record stays missing, at the next pass."""
    runner = runner_on(redis)
    runner._missing = set()
    (ended,) = lines_of("batch_prune", 1, failed={0})
    await runner.pipeline.store.create_lines([ended])
    await redis.sadd(SLOTS, "chatcmpl-not-written-yet", ended.id)
    await runner.prune_slots()
    assert await held(redis) == {"chatcmpl-not-written-yet"}
    await runner.prune_slots()
    assert await held(redis) == set()


async def test_pruning_walks_the_listed_slot_sets_not_the_keyspace(redis):
    """Slot pruning ran a SCAN of the whole keyspace every 5 s in every API process (issue
    12). A reservation lists its slot set; pruning walks that list, and SCANs only once, for
    sets an older version left unlisted."""
    runner = runner_on(redis)
    runner._missing = set()
    # A set left unlisted (an older version), with a line that ended: found by the one SCAN.
    (old,) = lines_of("batch_old", 1, failed={0})
    await runner.pipeline.store.create_lines([old])
    await redis.sadd(keys.batch_slots("old-model"), old.id)
    scans = 0
    scan_iter = redis.scan_iter

    def counting_scan(*args, **kwargs):
        nonlocal scans
        scans += 1
        return scan_iter(*args, **kwargs)

    redis.scan_iter = counting_scan
    await runner.prune_slots()
    assert await redis.scard(keys.batch_slots("old-model")) == 0
    # A reservation lists its set; a later pass frees its ended line without a SCAN.
    (ended,) = lines_of("batch_new", 1, failed={0})
    await runner.pipeline.store.create_lines([ended])
    assert await reserve(redis, 4, ended.id) == 1
    await runner.prune_slots()
    await runner.prune_slots()
    assert await held(redis) == set()
    assert scans == 1


async def test_a_group_of_lines_goes_out_several_to_a_message(redis):
    """A batch's lines go out several to a Celery message (issue 12: a message each cost
    the worker about half its CPU a line), a quarter of the smallest live worker's batch
    slots to a message, rounded up (here 16 and 32 slots at a 0.75 share: 12 / 4 = 3; 8
    slots: 6 / 4 -> 2), at most MESSAGE_LINES; an invalid line sends nothing."""
    import time
    from types import SimpleNamespace

    from api.batches.runner import MESSAGE_LINES, _Line
    from common.errors import InvalidRequestError
    from common.jobs import WorkerInfo

    for name, slots in (("w1", 16), ("w2", 32)):
        info = WorkerInfo(id=name, model="m", slots=slots, started=time.time())
        await redis.set(keys.worker(name), info.model_dump_json())
        await redis.zadd(keys.WORKERS, {name: time.time()})
    runner = runner_on(redis)
    batch = SimpleNamespace(id="batch_grouped", endpoint=CHAT)
    records = lines_of(batch.id, 9, failed={4})
    group = [_Line(i, r, InvalidRequestError("bad") if i == 4 else None) for i, r in enumerate(records)]
    await runner._hand_out(batch, group)
    valid = [r.id for i, r in enumerate(records) if i != 4]
    assert runner.pipeline.queue.messages == [valid[0:3], valid[3:6], valid[6:8]]
    # A small worker joins: 6 batch slots, 2 lines a message.
    info = WorkerInfo(id="w3", model="m", slots=8, started=time.time())
    await redis.set(keys.worker("w3"), info.model_dump_json())
    await redis.zadd(keys.WORKERS, {"w3": time.time()})
    runner = runner_on(redis)
    batch = SimpleNamespace(id="batch_small", endpoint=CHAT)
    records = lines_of(batch.id, 5)
    await runner._hand_out(batch, [_Line(i, r) for i, r in enumerate(records)])
    assert [len(m) for m in runner.pipeline.queue.messages] == [2, 2, 1]
    # A big worker alone: at most MESSAGE_LINES a message.
    await redis.delete(keys.WORKERS)
    info = WorkerInfo(id="big", model="m", slots=1024, started=time.time())
    await redis.set(keys.worker("big"), info.model_dump_json())
    await redis.zadd(keys.WORKERS, {"big": time.time()})
    runner = runner_on(redis)
    batch = SimpleNamespace(id="batch_big", endpoint=CHAT)
    records = lines_of(batch.id, 40)
    await runner._hand_out(batch, [_Line(i, r) for i, r in enumerate(records)])
    assert [len(m) for m in runner.pipeline.queue.messages] == [MESSAGE_LINES, MESSAGE_LINES, 8]


async def test_a_turn_hands_out_lines_prepared_earlier_before_it_prepares_more(redis):
    """Preparing lines (validation, chat template, tokenizer) is the slow part of a turn: a
    turn woken by lines ending sends the lines it prepared before, then prepares the next
    ones while those run, up to a capacity's worth beyond the free slots (issue 12; before,
    it prepared exactly the free slots' worth, then sent them)."""
    import time
    from types import SimpleNamespace

    from api.batches.runner import FIRST_GROUP, _Line, _Lines
    from common.jobs import WorkerInfo

    info = WorkerInfo(id="w", model="m", slots=64, started=time.time())  # 48 batch slots
    await redis.set(keys.worker("w"), info.model_dump_json())
    await redis.zadd(keys.WORKERS, {"w": time.time()})
    runner = runner_on(redis)
    batch = SimpleNamespace(id="batch_ahead", endpoint=CHAT)
    records = lines_of(batch.id, 200)
    events: list[str] = []

    async def live_models():
        return {}

    runner.chat = SimpleNamespace(catalog=SimpleNamespace(live_models=live_models))

    async def prepare(batch, index, line):
        events.append("prepare")
        return _Line(index, records[index])

    runner._prepare = prepare
    sent = runner.pipeline.queue.submit_groups

    async def submit_groups(groups, model, priority):
        events.append("send")
        await sent(groups, model, priority)

    runner.pipeline.queue.submit_groups = submit_groups
    lines = object.__new__(_Lines)
    lines.held, lines.eof, lines.model = [], False, None
    source = iter(range(len(records)))

    async def read(n):
        items = [(i, None) for _, i in zip(range(n), source, strict=False)]
        lines.eof = len(items) < n
        return items

    lines.read = read
    # The first turn knows no model yet: it prepares a first group and sends it.
    assert await runner._dispatch(batch, lines)
    assert len(runner.pipeline.queue.sent) == FIRST_GROUP
    # The next turn fills the free slots, and prepares a capacity's worth more.
    assert await runner._dispatch(batch, lines)
    assert len(runner.pipeline.queue.sent) == 48
    assert len(lines.held) == 48
    # Two lines end: the turn sends two lines prepared before, then prepares two more.
    await redis.srem(SLOTS, records[0].id, records[1].id)
    events.clear()
    assert await runner._dispatch(batch, lines)
    assert events == ["send", "prepare", "prepare"]
    assert runner.pipeline.queue.sent[48:] == [records[48].id, records[49].id]
    assert len(lines.held) == 48
