"""The worker runtime in this process, on a real Redis, with the fake engine: every way
out of a claimed job ends it or gives it back, leases outlive long jobs, and a dead
engine makes the worker give its jobs back, unregister and exit."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis as redis_lib
from redis.exceptions import ConnectionError as RedisConnectionError

from common import keys
from common.jobstore import JobStore
from common.reaper import Reaper
from common.settings import Settings
from tests.core.conftest import job
from tests.core.test_reaper import Sent
from tests.unit.test_tasks import losing_its_first_cancellation
from worker import runtime as runtime_module
from worker.fake_engine import FakeEngine
from worker.runtime import DYING_RESEND_DELAY_SECONDS, EXIT_ENGINE_DEAD, WorkerRuntime, unique_worker_id

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def runtime(redis, redis_url):
    settings = Settings(
        redis_url=redis_url,
        engine="fake",
        fake_step_seconds=0.02,
        heartbeat_seconds=0.1,
        lease_seconds=0.5,
        reaper_interval_seconds=0.1,
        queue_resend_seconds=60,
    )
    sent = Sent()
    exits: list[tuple[int, dict[str, str], list, dict[str, float]]] = []
    sync = redis_lib.Redis.from_url(redis_url)

    def on_fatal(code: int) -> None:
        # What a restarted worker, or anyone else, finds at the moment this process exits:
        # each job's status, the messages sent, and how long until each queued job is due
        # for another process's reaper to send its message.
        statuses = {k.decode(): sync.hget(k, "status").decode() for k in sync.scan_iter("llmq:job:*")}
        now = time.time()
        due_in = {keys.text(j): score - now for j, score in sync.zrange(keys.QUEUED, 0, -1, withscores=True)}
        exits.append((code, statuses, list(sent.calls), due_in))

    rt = WorkerRuntime(settings, FakeEngine(settings), unique_worker_id("w1@test"), sent, on_fatal=on_fatal)
    await asyncio.to_thread(rt.start)
    rt.sent, rt.exits = sent, exits  # type: ignore[attr-defined]
    yield rt
    await asyncio.to_thread(rt.stop)


async def queued(redis, **kw):
    record = job(**kw)
    await JobStore(redis, 3600).create(record)
    return record


async def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def test_worker_ids_are_unique_per_process_under_one_name():
    assert unique_worker_id("w@h") != unique_worker_id("w@h")
    assert unique_worker_id("w@h").startswith("w@h/")


async def test_stop_ends_a_background_loop_that_lost_its_cancellation(runtime):
    """A worker's stop waited forever (its minute, then TimeoutError) for a background loop
    whose cancellation a library lost (seen in `make test`: the reaper's, on Python 3.11);
    it cancels such a loop again until it ends."""
    cancels: list[int] = []

    async def add() -> asyncio.Task:
        task = asyncio.create_task(runtime._forever(losing_its_first_cancellation(cancels)))
        runtime._tasks.append(task)
        return task

    task = asyncio.run_coroutine_threadsafe(add(), runtime.loop).result(5)
    await asyncio.wait_for(asyncio.to_thread(runtime.stop), 20)
    assert task.cancelled() and len(cancels) == 2


async def test_a_long_job_keeps_its_lease_and_completes_in_one_attempt(runtime, redis):
    record = await queued(redis, max_tokens=8 * 60)  # about 1.2 s: more than two leases
    result = await asyncio.to_thread(runtime.run_job, record.id)
    assert result["status"] == "completed" and result["attempt"] == 1
    stored = await JobStore(redis, 3600).get(record.id)
    assert stored.status.value == "completed" and stored.usage.completion_tokens == 480
    assert await redis.zscore(keys.LEASES, record.id) is None


async def test_a_job_started_early_runs_once_and_its_task_waits_for_it(runtime, redis):
    """The consumer starts a job as its message arrives (`start_early`); the task's
    run_job then waits for that attempt instead of starting another. Two messages of
    one job (a resend) each get an attempt of their own: one runs, the claim refuses the
    other."""
    record = await queued(redis, max_tokens=16)
    runtime.start_early(record.id)
    assert runtime.started_early(record.id)
    # The job runs before any task asks for it.
    store = JobStore(redis, 3600)
    await wait_until(lambda: _status_is(store, record.id, "running", "completed"))
    result = await asyncio.to_thread(runtime.run_job, record.id)
    assert result["status"] == "completed" and result["attempt"] == 1
    assert not runtime.started_early(record.id) and runtime._early == {}
    stored = await store.get(record.id)
    assert stored.attempt == 1 and stored.usage.completion_tokens == 16

    again = await queued(redis, max_tokens=16)
    runtime.start_early(again.id)
    runtime.start_early(again.id)
    first, second = await asyncio.gather(
        asyncio.to_thread(runtime.run_job, again.id), asyncio.to_thread(runtime.run_job, again.id)
    )
    ran = [r for r in (first, second) if r.get("started", True)]
    assert len(ran) == 1 and ran[0]["status"] == "completed" and ran[0]["attempt"] == 1
    assert (await store.get(again.id)).attempt == 1 and runtime._early == {}


async def test_a_revoked_early_job_runs_on_unwaited(runtime, redis):
    record = await queued(redis, max_tokens=8)
    runtime.start_early(record.id)
    runtime.forget_early(record.id)  # its task will not run
    assert not runtime.started_early(record.id) and runtime._early == {}
    store = JobStore(redis, 3600)
    await wait_until(lambda: _status_is(store, record.id, "completed"))


async def _status_is(store: JobStore, job_id: str, *statuses: str) -> bool:
    got = await store.status(job_id)
    return got is not None and got.value in statuses


async def test_a_redis_error_right_after_the_claim_gives_the_job_back(runtime, redis, monkeypatch):
    """The claim ran but its reply (with the record, one round trip) was lost, and reading
    the record then failed too: the claim is made again with the same token (the same
    attempt) and the job given back."""
    record = await queued(redis)
    real_claim_record = runtime.store.claim_record

    async def reply_lost(*args, **kwargs):
        await real_claim_record(*args, **kwargs)
        raise RedisConnectionError("connection reset")

    monkeypatch.setattr(runtime.store, "claim_record", reply_lost)
    real_get = runtime.store.get
    calls = {"n": 0}

    async def flaky_get(job_id):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RedisConnectionError("connection reset")
        return await real_get(job_id)

    monkeypatch.setattr(runtime.store, "get", flaky_get)
    with pytest.raises(RedisConnectionError):
        await asyncio.to_thread(runtime.run_job, record.id)
    stored = await JobStore(redis, 3600).get(record.id)
    assert stored.status.value == "queued" and stored.attempt == 1
    assert await redis.zscore(keys.LEASES, record.id) is None
    assert runtime.sent.calls == [(record.id, "m", keys.CHAT_PRIORITY)]


async def test_a_log_cut_short_under_the_worker_gives_the_job_back(runtime, redis):
    """Redis restarted under AOF and lost the log's tail: the worker cannot continue the
    log, so it hands the job to a new attempt, which continues from what the log holds."""
    record = await queued(redis, max_tokens=8 * 100)
    running = asyncio.create_task(asyncio.to_thread(runtime.run_job, record.id))
    await wait_until(lambda: _len_at_least(redis, record.id, 3))
    await redis.ltrim(keys.job_log(record.id), 0, 0)
    result = await asyncio.wait_for(running, 20)
    assert result["status"] == "released"
    stored = await JobStore(redis, 3600).get(record.id)
    assert stored.status.value == "queued" and runtime.sent.calls == [(record.id, "m", keys.CHAT_PRIORITY)]
    # The next attempt continues after the one event left and completes the job.
    result = await asyncio.to_thread(runtime.run_job, record.id)
    assert result["status"] == "completed" and result["attempt"] == 2
    events = await JobStore(redis, 3600).log(record.id)
    assert [e.seq for e in events] == list(range(len(events))) and events[-1].kind == "done"
    assert sum(len(c.token_ids) for e in events for c in e.choices) == 800


async def test_a_dead_engine_gives_jobs_back_unregisters_and_exits(runtime, redis, monkeypatch):
    records = [await queued(redis, max_tokens=8 * 200) for _ in range(2)]
    running = [asyncio.create_task(asyncio.to_thread(runtime.run_job, r.id)) for r in records]
    for r in records:
        await wait_until(lambda r=r: _len_at_least(redis, r.id, 1))
    # A slow Redis: the process must not leave before its jobs are given back.
    real_get = runtime.store.get

    async def slow_get(job_id):
        await asyncio.sleep(0.3)
        return await real_get(job_id)

    monkeypatch.setattr(runtime.store, "get", slow_get)
    assert await redis.zscore(keys.WORKERS, runtime.worker_id) is not None
    runtime.engine.die()
    await asyncio.wait_for(asyncio.gather(*running), 20)
    await wait_until(lambda: _true(len(runtime.exits) == 1))
    code, at_exit, sent_at_exit, due_at_exit = runtime.exits[0]
    assert code == EXIT_ENGINE_DEAD
    # Every job was given back before the process left (not left to a lapsing lease),
    # its message left to another process's sweep once this one has gone, so that this
    # worker cannot take it again on its way out.
    assert at_exit == {keys.job(r.id): "queued" for r in records}
    assert sent_at_exit == []
    assert all(0 < due_at_exit[r.id] <= DYING_RESEND_DELAY_SECONDS for r in records), due_at_exit
    assert await redis.zscore(keys.WORKERS, runtime.worker_id) is None
    # And it takes no more jobs.
    assert (await asyncio.to_thread(runtime.run_job, records[0].id))["started"] is False


async def test_a_dying_worker_s_jobs_are_not_resent_until_it_has_gone(runtime, redis, monkeypatch):
    """Until its process is gone, a dying worker's Celery consumer still pops messages off
    its queue, and a message it pops on its way out is lost (or stuck unacknowledged) until
    the sweep sends it once more, `queue_resend_seconds` later: the job would wait that long
    for another worker. So another process's reaper, sweeping at the moment the worker
    gives its jobs back and leaves, must not send their messages yet; it sends them once
    the worker has gone (DYING_RESEND_DELAY_SECONDS, shortened here)."""
    monkeypatch.setattr(runtime_module, "DYING_RESEND_DELAY_SECONDS", 0.5)
    record = await queued(redis, max_tokens=8 * 200)
    running = asyncio.create_task(asyncio.to_thread(runtime.run_job, record.id))
    await wait_until(lambda: _len_at_least(redis, record.id, 1))
    runtime.engine.die()
    await asyncio.wait_for(running, 20)
    await wait_until(lambda: _true(len(runtime.exits) == 1))
    _, at_exit, _, due_at_exit = runtime.exits[0]
    assert at_exit == {keys.job(record.id): "queued"}
    # Not due while the worker leaves: a sweep now (another API process or worker) sends nothing.
    assert due_at_exit[record.id] > 0, due_at_exit
    await asyncio.to_thread(runtime.stop)  # the process is gone (its own reaper with it)
    sent = Sent()
    other = Reaper(JobStore(redis, 3600, 60), sent, Settings(reaper_interval_seconds=0.05, queue_resend_seconds=60))
    assert await other.sweep_queued() == [] and sent.calls == []
    # Once it has gone, the next sweep sends the message, once.
    await wait_until(lambda: _swept(other, record.id))
    assert sent.calls == [(record.id, "m", keys.CHAT_PRIORITY)]


async def _swept(reaper: Reaper, job_id: str) -> bool:
    return (job_id, "resend") in await reaper.sweep_queued()


async def _len_at_least(redis, job_id: str, n: int) -> bool:
    return await redis.llen(keys.job_log(job_id)) >= n


async def _true(value: bool) -> bool:
    return value


async def test_a_background_loop_that_lost_redis_restarts_with_a_warning_not_a_traceback(caplog, monkeypatch):
    """A Redis restart or a Sentinel failover makes every background loop of a worker
    lose its connection: each says so in one warning line and starts again; any other
    failure keeps its traceback."""
    monkeypatch.setattr(runtime_module.asyncio, "sleep", _no_sleep)
    failures = [RedisConnectionError("Connection refused"), ValueError("a bug")]

    async def loop_body() -> None:
        if failures:
            raise failures.pop(0)

    with caplog.at_level("WARNING", logger="worker.runtime"):
        await WorkerRuntime._forever(None, loop_body)  # type: ignore[arg-type]
    lost, bug = [r for r in caplog.records if r.name == "worker.runtime"]
    assert lost.levelname == "WARNING" and "lost Redis (Connection refused)" in lost.getMessage()
    assert lost.exc_info is None
    assert bug.levelname == "ERROR" and bug.exc_info is not None


async def _no_sleep(_seconds: float) -> None:
    return None
