"""Every JobStore script on a real Redis: run twice (a retry after a lost reply),
interleaved with the others, and fenced by attempt. Each race of docs/ARCHITECTURE.md's
table is pinned here by name."""

from __future__ import annotations

import asyncio
import time

import pytest

from common import keys
from common.jobs import ChoiceDelta, ChunkEvent, JobStatus
from common.jobstore import JobStore, new_claim_token
from tests.core.conftest import job

pytestmark = pytest.mark.asyncio
ERROR = {"message": "gone", "type": "service_unavailable", "param": None, "code": "worker_lost"}


def delta(seq: int, attempt: int = 1, tokens: int = 1) -> str:
    return ChunkEvent(
        seq=seq,
        kind="delta",
        attempt=attempt,
        choices=[ChoiceDelta(index=0, text="x" * tokens, token_ids=[7] * tokens)],
    ).encode()


def done(seq: int, attempt: int = 1) -> str:
    return ChunkEvent(
        seq=seq, kind="done", attempt=attempt, choices=[ChoiceDelta(index=0, finish_reason="length")]
    ).encode()


async def finish(store: JobStore, record, attempt: int, seq: int, status: str = "completed") -> int:
    return int(
        await store.finish_in(
            store.redis,
            record.id,
            record.model,
            attempt,
            done(seq, attempt),
            seq,
            {"status": status},
            record.batch,
            record.owner,
        )
    )


async def state(store: JobStore, job_id: str) -> tuple[str, list[ChunkEvent], float | None, float | None]:
    record = await store.get(job_id)
    assert record is not None
    lease = await store.redis.zscore(keys.LEASES, job_id)
    queued = await store.redis.zscore(keys.QUEUED, job_id)
    return record.status.value, await store.log(job_id), lease, queued


async def test_create_is_idempotent_and_indexes_queued_jobs(redis):
    store = JobStore(redis, 3600)
    record = job()
    assert await store.create(record) == (1, 0)
    assert await store.create(record) == (0, 0)  # a batch line handed out again: kept as it is
    status, log, lease, queued = await state(store, record.id)
    assert status == "queued" and log == [] and lease is None and queued is not None


async def test_claim_twice_with_one_token_is_one_attempt(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    token = new_claim_token()
    assert await store.claim(record.id, record.model, "w1", token, 10) == 1
    assert await store.claim(record.id, record.model, "w1", token, 10) == 1  # the retry of a lost reply
    assert await store.claim(record.id, record.model, "w2", new_claim_token(), 10) == "in_progress"  # a duplicate
    status, _, lease, queued = await state(store, record.id)
    assert status == "in_progress" and lease is not None and queued is None


async def test_append_is_fenced_by_attempt_and_status_and_idempotent(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    assert await store.append(record.id, 1, 0, [delta(0)]) == -1  # not claimed yet
    await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    assert await store.append(record.id, 1, 0, [delta(0), delta(1)]) == 2
    assert await store.append(record.id, 1, 0, [delta(0), delta(1)]) == 2  # retried: no duplicates
    assert await store.append(record.id, 1, 3, [delta(3)]) == -1  # a gap: refused
    assert await store.append(record.id, 2, 2, [delta(2, 2)]) == -1  # another attempt's writer
    assert [e.seq for e in await store.log(record.id)] == [0, 1]


async def test_one_append_call_serves_several_jobs_each_fenced_on_its_own(redis):
    """The publisher appends every job's events in one script call: each job's answer is
    its own (a job another attempt holds, or with a gap, refuses only its own events)."""
    store = JobStore(redis, 3600)
    a, b, c = job(), job(), job()
    for record in (a, b, c):
        await store.create(record)
        await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    appends = [(a.id, 1, 0, [delta(0), delta(1)]), (b.id, 2, 0, [delta(0, 2)]), (c.id, 1, 1, [delta(1)])]
    assert [int(n) for n in await store.append_in(redis, appends)] == [2, -1, -1]
    # Retried (a lost reply): no duplicates; the others went on meanwhile.
    appends = [(a.id, 1, 0, [delta(0), delta(1)]), (b.id, 1, 0, [delta(0)]), (c.id, 1, 0, [delta(0)])]
    assert [int(n) for n in await store.append_in(redis, appends)] == [2, 1, 1]
    assert [e.seq for e in await store.log(a.id)] == [0, 1]
    assert [e.seq for e in await store.log(b.id)] == [0] and [e.seq for e in await store.log(c.id)] == [0]


async def test_finish_retried_after_success_answers_done_once(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    await store.append(record.id, 1, 0, [delta(0)])
    assert await finish(store, record, 1, 1) == 1
    assert await finish(store, record, 1, 1) == 1
    status, log, lease, queued = await state(store, record.id)
    assert status == "completed" and [e.kind for e in log] == ["delta", "done"] and lease is None and queued is None


async def test_race_cancel_queued_then_claim(redis):
    """Cancel wins over a later claim: the job never starts; its stream ends `cancelled`."""
    store = JobStore(redis, 3600)
    record = job(prompt=5)
    await store.create(record)
    assert await store.cancel(record) == "queued"
    assert await store.cancel(record) == "cancelled"  # run again: same end, no second event
    assert await store.claim(record.id, record.model, "w1", new_claim_token(), 10) == "cancelled"
    status, log, _, queued = await state(store, record.id)
    assert status == "cancelled" and queued is None
    assert len(log) == 1 and log[0].kind == "done" and log[0].choices[0].finish_reason == "cancelled"
    assert log[0].usage is not None and log[0].usage.prompt_tokens == 5 and log[0].usage.completion_tokens == 0


async def test_race_claim_then_cancel(redis):
    """Claim first: the cancel only flags the job; its worker aborts it and writes the end."""
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    assert await store.cancel(record) == "in_progress"
    assert await store.cancel_requested([record.id]) == {record.id}
    assert await finish(store, record, 1, 0, status="cancelled") == 1
    assert (await store.get(record.id)).status == JobStatus.cancelled


async def test_race_finish_then_reap(redis):
    """The worker finished just as its lease lapsed: the reaper leaves the job alone."""
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    assert await finish(store, record, 1, 0) == 1
    time.sleep(0.02)
    assert await store.reap(record, 3, ERROR) == "skip"
    assert (await store.get(record.id)).status == JobStatus.completed


async def test_race_reap_then_late_append_and_finish(redis):
    """The lease lapsed first: the job is queued again and the old attempt's late writes
    are refused (and keep being refused once a new attempt holds it)."""
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    await store.append(record.id, 1, 0, [delta(0)])
    time.sleep(0.02)
    assert await store.reap(record, 3, ERROR) == "requeued"
    assert await store.reap(record, 3, ERROR) == "requeued"  # run again: the same answer (the message is resent)
    assert await store.append(record.id, 1, 1, [delta(1)]) == -1
    assert await finish(store, record, 1, 1) == 0
    status, log, lease, queued = await state(store, record.id)
    assert status == "queued" and len(log) == 1 and lease is None and queued is not None
    assert await store.claim(record.id, record.model, "w2", new_claim_token(), 10) == 2
    assert await store.append(record.id, 1, 1, [delta(1)]) == -1
    assert await store.append(record.id, 2, 1, [delta(1, 2)]) == 2


async def test_reap_of_a_renewed_lease_is_live(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    time.sleep(0.02)
    assert await store.renew("w1", {record.id: 1}, 10) == set()
    assert await store.reap(record, 3, ERROR) == "live"
    assert await store.renew("w2", {record.id: 1}, 10) == {record.id}  # not w2's job


async def test_reap_with_attempts_used_up_fails_with_an_error_event(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    time.sleep(0.02)
    assert await store.reap(record, 1, ERROR) == "failed"
    assert await store.reap(record, 1, ERROR) == "failed"
    status, log, lease, _ = await state(store, record.id)
    assert status == "failed" and lease is None and [e.kind for e in log] == ["error"]
    assert log[0].error == ERROR and (await store.get(record.id)).error == ERROR


async def test_race_cancel_running_then_reap(redis):
    """A cancel was pending when the worker died: the reaper ends the job `cancelled`,
    counting the tokens already sent."""
    store = JobStore(redis, 3600)
    record = job(prompt=2)
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 0.01)
    await store.append(record.id, 1, 0, [delta(0, tokens=3)])
    assert await store.cancel(record) == "in_progress"
    time.sleep(0.02)
    assert await store.reap(record, 3, ERROR) == "cancelled"
    _, log, _, _ = await state(store, record.id)
    assert log[-1].kind == "done" and log[-1].usage.completion_tokens == 3 and log[-1].usage.total_tokens == 5


async def test_release_twice_is_one_release_and_only_by_the_holder(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    assert await store.release(record.id, record.model, 1, "w2") == 0
    assert await store.release(record.id, record.model, 1, "w1") == 2
    assert await store.release(record.id, record.model, 1, "w1") == 1  # run again: already given back
    status, _, lease, queued = await state(store, record.id)
    assert status == "queued" and lease is None and queued is not None
    assert await store.claim(record.id, record.model, "w2", new_claim_token(), 10) == 2
    assert await store.release(record.id, record.model, 1, "w1") == 0  # the old attempt cannot take it back


async def test_sweep_keeps_or_ends_a_queued_job(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    assert await store.sweep(record, None) == "resend"
    assert await store.sweep(record, None) == "wait"  # the next resend waits twice as long
    assert await store.sweep(record, ERROR) == "failed"
    assert await store.sweep(record, ERROR) == "skip"  # run again: nothing more
    status, log, _, queued = await state(store, record.id)
    assert status == "failed" and queued is None and [e.kind for e in log] == ["error"]


async def test_batch_lines_count_once_in_sets_and_free_their_slot(redis):
    store = JobStore(redis, 3600)
    a, b = job(batch="batch_x"), job(batch="batch_x")
    for r in (a, b):
        await store.create(r)
        await redis.sadd(keys.batch_slots("m"), r.id)
    await store.claim(a.id, a.model, "w1", new_claim_token(), 10)
    await finish(store, a, 1, 0)
    await finish(store, a, 1, 0)
    await store.cancel(b)
    await store.cancel(b)
    assert await redis.smembers(keys.batch_ended("batch_x", "completed")) == {a.id.encode()}
    assert await redis.smembers(keys.batch_ended("batch_x", "cancelled")) == {b.id.encode()}
    assert await redis.scard(keys.batch_slots("m")) == 0


async def waiting(redis, model: str = "m") -> set[str]:
    return {keys.text(j) for j in await redis.zrange(keys.waiting(model), 0, -1)}


async def active(redis, owner: str) -> set[str]:
    return {keys.text(j) for j in await redis.smembers(keys.active(owner))}


async def test_admission_refuses_past_the_model_queue_limit_and_writes_nothing(redis):
    store = JobStore(redis, 3600)
    first, second, third = job(owner="k1"), job(owner="k2"), job(owner="k1")
    # Stored: with the model's waiting jobs now (`look` keeps the count).
    assert await store.create(first, max_waiting=2) == (1, 1)
    assert await store.create(second, max_waiting=2) == (1, 2)
    assert await store.create(third, max_waiting=2) == (-1, 2)
    assert await store.get(third.id) is None and await redis.zscore(keys.QUEUED, third.id) is None
    assert await waiting(redis) == {first.id, second.id}
    # A batch line is never refused and never counts as waiting.
    line = job(batch="batch_x", owner="k1")
    assert await store.create(line, max_waiting=2) == (1, 0)
    assert await waiting(redis) == {first.id, second.id}
    # Once one starts, there is room again.
    assert await store.claim(first.id, first.model, "w1", new_claim_token(), 10) == 1
    assert await store.create(third, max_waiting=2) == (1, 2)


async def test_admission_refuses_past_the_owner_limit_until_one_ends(redis):
    store = JobStore(redis, 3600)
    a, b, c = job(owner="k1"), job(owner="k1"), job(owner="k1")
    other = job(owner="k2")
    assert await store.create(a, max_active=2) == (1, 0)
    assert await store.create(b, max_active=2) == (1, 0)
    assert await store.create(c, max_active=2) == (-2, 2)
    assert await store.create(other, max_active=2) == (1, 0)  # another key is not held back
    # Running still counts; ending (any way) frees the place.
    await store.claim(a.id, a.model, "w1", new_claim_token(), 10)
    assert await store.create(c, max_active=2) == (-2, 2)
    assert await finish(store, a, 1, 0) == 1
    assert await active(redis, "k1") == {b.id}
    assert await store.create(c, max_active=2) == (1, 0)
    await store.cancel(b)
    await store.sweep(c, ERROR)
    assert await active(redis, "k1") == set() and await waiting(redis) == {other.id}


async def test_waiting_set_follows_claims_releases_and_reaps(redis):
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    assert await waiting(redis) == {record.id}
    await store.claim(record.id, record.model, "w1", new_claim_token(), 10)
    assert await waiting(redis) == set()
    assert await store.release(record.id, record.model, 1, "w1") == 2
    assert await waiting(redis) == {record.id}  # given back: it waits again
    await store.claim(record.id, record.model, "w2", new_claim_token(), 0.01)
    time.sleep(0.02)
    assert await store.reap(record, 3, ERROR) == "requeued"
    assert await waiting(redis) == {record.id}
    await store.claim(record.id, record.model, "w3", new_claim_token(), 0.01)
    time.sleep(0.02)
    assert await store.reap(record, 3, ERROR) == "failed"  # attempts used up: ended
    assert await waiting(redis) == set() and await active(redis, "") == set()


async def test_claims_count_the_drain_rate_once_per_start(redis):
    store = JobStore(redis, 3600)
    records = [job() for _ in range(3)]
    token = new_claim_token()
    for r in records:
        await store.create(r)
    now = time.time()
    await store.claim(records[0].id, "m", "w1", token, 10)
    await store.claim(records[0].id, "m", "w1", token, 10)  # a retried claim is not a second start
    await store.claim(records[1].id, "m", "w1", new_claim_token(), 10)
    buckets = [keys.started("m", now), keys.started("m", time.time())]
    counts = [int(c or 0) for c in await redis.mget(list(dict.fromkeys(buckets)))]
    assert sum(counts) == 2
    assert 0 < await redis.ttl(buckets[-1]) <= 120


async def test_claim_record_claims_and_reads_the_record_in_one_round_trip(redis):
    """The worker claims a job and reads its record together (issue 12): the record as it
    is after the claim; a refused claim answers its status; after Redis lost its scripts
    (restarted) the claim is loaded and run once."""
    store = JobStore(redis, 3600)
    record = job()
    await store.create(record)
    calls = 0
    pipeline = redis.pipeline

    def counting_pipeline(*args, **kwargs):
        nonlocal calls
        calls += 1
        return pipeline(*args, **kwargs)

    redis.pipeline = counting_pipeline
    await redis.script_flush()
    claimed, stored = await store.claim_record(record.id, record.model, "w1", new_claim_token(), 10)
    assert claimed == 1
    assert stored is not None and stored.id == record.id and stored.status == "in_progress"
    assert stored.started is not None and stored.attempt == 1
    assert calls == 2  # NOSCRIPT: loaded, then one round trip
    refused, again = await store.claim_record(record.id, record.model, "w2", new_claim_token(), 10)
    assert refused == "in_progress" and again is not None and again.attempt == 1
    assert calls == 3
    missing, none = await store.claim_record("chatcmpl-missing", record.model, "w1", new_claim_token(), 10)
    assert isinstance(missing, str) and none is None


async def test_claims_made_together_go_out_in_one_round_trip(redis):
    """A worker's jobs arrive many a millisecond under load: their claims share a pipeline
    (issue 12), each answered as if alone (claimed, refused with the status, missing)."""
    store = JobStore(redis, 3600)
    records = [job() for _ in range(6)]
    for r in records:
        await store.create(r)
    await store.claim(records[0].id, "m", "w0", new_claim_token(), 10)  # already running
    calls = 0
    pipeline = redis.pipeline

    def counting_pipeline(*args, **kwargs):
        nonlocal calls
        calls += 1
        return pipeline(*args, **kwargs)

    redis.pipeline = counting_pipeline
    ids = [r.id for r in records] + ["chatcmpl-missing"]
    answers = await asyncio.gather(*(store.claim_record(i, "m", "w1", new_claim_token(), 10) for i in ids))
    assert calls == 1
    assert answers[0][0] == "in_progress" and answers[0][1] is not None and answers[0][1].attempt == 1
    for (claimed, stored), r in zip(answers[1:-1], records[1:], strict=True):
        assert claimed == 1 and stored is not None and stored.id == r.id and stored.status == "in_progress"
    assert isinstance(answers[-1][0], str) and answers[-1][1] is None
    assert set(await redis.zrange(keys.LEASES, 0, -1)) == {r.id.encode() for r in records}
