"""The worker runtime: one engine on one long-lived event loop, shared by all task slots.

Celery runs the worker's tasks in threads (one per slot). Each task hands its job id to
`WorkerRuntime.run_job`, which runs the job as a coroutine on the runtime's loop, where
the engine lives; so every job the worker holds sits in the same engine batch. The
runtime also publishes chunk events, keeps the worker's registration and its jobs'
leases alive, and aborts jobs that are cancelled.

Every job it claims ends in a terminal write (completed, failed, cancelled) or is given
back to the queue (`release`); if even that cannot reach Redis, the job's lease lapses
and the reaper takes it back. A worker whose engine has died releases its jobs,
unregisters and exits non-zero (`EXIT_ENGINE_DEAD`), for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import keys, timing
from common.errors import EngineError, InvalidRequestError, ServiceError
from common.heap import freeze_startup_heap
from common.jobs import (
    ChoiceDelta,
    ChoiceResult,
    ChunkEvent,
    JobRecord,
    JobRequest,
    JobResult,
    JobStatus,
    ModelCard,
    WorkerInfo,
    extend_logprobs,
)
from common.jobstore import JobStore, new_claim_token
from common.logs import job_fields, log_event
from common.metrics import JOBS_ENDED
from common.reaper import Reaper, Requeue, priority_of
from common.redis_client import connect
from common.schemas import Usage
from common.settings import Settings
from common.tasks import cancel_and_wait
from worker import metrics
from worker.engine import Engine, EngineRequestError
from worker.publisher import ChunkPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")
# Exit status of a worker whose engine died (or never started): its supervisor restarts it.
EXIT_ENGINE_DEAD = 3
# A dying worker's jobs are queued again at once, but their messages are due (for another
# process's reaper to send) only this long after: until its process is gone, its Celery
# consumer still pops messages off the queue, and one it pops on its way out is lost
# (or stuck unacknowledged for the broker's visibility timeout) until the sweep sends it
# once more, `queue_resend_seconds` later. Leaving takes well under a second (give back,
# unregister, `os._exit`); a message lost all the same is still sent again by that sweep.
DYING_RESEND_DELAY_SECONDS = 5.0


def _exit(code: int) -> None:
    """Leave now (from the engine loop's thread), logs flushed: the supervisor restarts us."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


def unique_worker_id(name: str) -> str:
    """Celery's node name plus this process: two processes started under one name (a
    copied command line, a restarted container) still hold their jobs apart."""
    return f"{name}/{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        worker_id: str,
        requeue: Requeue,
        on_fatal: Callable[[int], None] | None = None,
        metrics_url: str | None = None,
    ):
        self.settings = settings
        # Where this worker's Prometheus metrics are served (worker/metrics.py), announced
        # in its registration.
        self.metrics_url = metrics_url
        self._requeue = requeue
        self.engine = engine
        self.worker_id = worker_id
        # What to do once the engine is dead and the jobs are given back (the Celery
        # worker exits the process; tests watch it).
        self._on_fatal = on_fatal or _exit
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._tasks: list[asyncio.Task[Any]] = []
        self._inflight: dict[str, int] = {}  # job id -> attempt
        self._cancelled: set[str] = set()
        self._lost: set[str] = set()
        # Logs (issue 9): what each line about a job held here names (id, model, key id, batch).
        self._log_fields: dict[str, dict[str, Any]] = {}
        self._releasing: dict[str, asyncio.Future[bool]] = {}
        # Attempts started as their message arrived (`start_early`), by job id, for their
        # tasks to wait on (a list: two messages of one job may both be here).
        self._early: dict[str, list[concurrent.futures.Future[dict[str, Any]]]] = {}
        self._early_lock = threading.Lock()
        self.dead = False
        self.redis: aioredis.Redis | None = None
        self.store: JobStore | None = None
        self.publisher: ChunkPublisher | None = None
        self.card: ModelCard | None = None
        self._started = time.time()
        self._tokenizer_files: dict[str, bytes] = {}

    # -- lifecycle (called from Celery's threads) ---------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def run_job(self, job_id: str) -> dict[str, Any]:
        """Run one job to its end (or wait for the attempt `start_early` started); blocks
        the calling task thread, not the engine."""
        early = self._take_early(job_id)
        if early is not None:
            return early.result()
        return self._call(self._run_job(job_id))

    def _take_early(self, job_id: str) -> concurrent.futures.Future[dict[str, Any]] | None:
        """The oldest attempt `start_early` started for `job_id` and no task took yet."""
        with self._early_lock:
            waiting = self._early.get(job_id)
            if not waiting:
                return None
            early = waiting.pop(0)
            if not waiting:
                del self._early[job_id]
            return early

    def started_early(self, job_id: str) -> bool:
        with self._early_lock:
            return bool(self._early.get(job_id))

    def forget_early(self, job_id: str) -> None:
        """A message whose task will not run (revoked after `start_early`): its attempt
        runs on to its end, unwaited for."""
        self._take_early(job_id)

    def start_early(self, job_id: str) -> None:
        """Start a job on the engine loop now: called from the Celery consumer's thread as
        the job's message arrives, before the thread pool hands its task to a slot thread
        (a millisecond at one stream, more under a burst, all of it before the first
        token); that task's `run_job` then waits for this attempt. A message revoked in
        between (Celery checks again before the pool, in the same call of the consumer's)
        leaves its job running with no task: it ends as any job does. Not for group
        messages (batch lines), nor once the engine is dead (the task gives the message back)."""
        if self.dead:
            return
        future = asyncio.run_coroutine_threadsafe(self._run_job(job_id), self.loop)
        with self._early_lock:
            self._early.setdefault(job_id, []).append(future)

    def run_jobs(self, job_ids: list[str], on_end: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run a group of jobs together to their ends (`on_end` called as each ends); how
        many ended each way (`run_job`'s status)."""
        return self._call(self._run_jobs(job_ids, on_end))

    async def _run_jobs(self, job_ids: list[str], on_end: Callable[[], None] | None) -> dict[str, Any]:
        async def one(job_id: str) -> str:
            try:
                return str((await self._run_job(job_id)).get("status"))
            finally:
                if on_end is not None:
                    on_end()

        counts: dict[str, int] = {}
        for job_id, outcome in zip(
            job_ids, await asyncio.gather(*(one(j) for j in job_ids), return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException):
                log.error("job %s of a group failed: %r", job_id, outcome, exc_info=outcome)
                outcome = "error"
            counts[outcome] = counts.get(outcome, 0) + 1
        return {"jobs": len(job_ids), "status": counts}

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- on the loop ------------------------------------------------------------------

    async def _start(self) -> None:
        self.redis = connect(
            self.settings.redis_url, self.settings.redis_max_connections, self.settings.redis_pool_timeout_seconds
        )
        await self.engine.start()
        self._tokenizer_files = self.engine.tokenizer_files()
        digest = hashlib.sha256()
        for name in sorted(self._tokenizer_files):
            digest.update(name.encode() + b"\0" + self._tokenizer_files[name] + b"\0")
        self.card = ModelCard(
            name=self.settings.model_name,
            max_model_len=self.engine.max_model_len,
            dtype=self.engine.dtype,
            tokenizer_digest=digest.hexdigest()[:32],
            created=int(time.time()),
            # What its engine's parsers can do (issue 10): the API refuses the rest.
            tool_call_parser=self.settings.served_tool_call_parser,
            auto_tool_choice=self.settings.served_tool_call_parser is not None,
            reasoning_parser=self.settings.reasoning_parser or None,
        )
        self.store = JobStore(self.redis, self.settings.job_ttl_seconds, self.settings.queue_resend_seconds)
        self.publisher = ChunkPublisher(self.store, self.settings.model_name, on_lost=self._on_lost)
        # Metrics (issue 9): the jobs held now, read at each scrape.
        metrics.JOBS_IN_FLIGHT.labels(self.settings.model_name).set_function(lambda: len(self._inflight))
        await self._register()
        reaper = Reaper(self.store, self._requeue, self.settings)
        for factory in (
            self.publisher.run,
            self._heartbeat,
            self._listen_cancellations,
            self._poll_cancellations,
            self._watch_engine,
            reaper.run,
        ):
            self._tasks.append(asyncio.create_task(self._forever(factory)))
        # The imports (torch, vLLM) and the engine live as long as the process: out of the
        # collector's sight, so a full collection does not stall every stream for 340 ms.
        freeze_startup_heap("worker")

    async def _stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self.redis is not None:
            await self._unregister()
            await self.redis.aclose()
        await self.engine.shutdown()

    async def _forever(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Keep a background loop alive across Redis outages."""
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                # Redis away (restarted, failing over): expected, and said without a traceback.
                log.warning("%s lost Redis (%s); restarting in 1 s", getattr(factory, "__name__", factory), exc)
                await asyncio.sleep(1)
            except Exception:
                log.exception("%s failed; restarting in 1 s", getattr(factory, "__name__", factory))
                await asyncio.sleep(1)

    async def _register(self) -> None:
        assert self.redis is not None and self.card is not None
        s = self.settings
        info = WorkerInfo(
            id=self.worker_id,
            model=s.model_name,
            slots=s.worker_slots,
            started=self._started,
            inflight=len(self._inflight),
            metrics_url=self.metrics_url,
        )
        ttl = max(1, int(s.worker_ttl_seconds))
        bundle = keys.tokenizer_bundle(self.card.tokenizer_digest)
        # The tokenizer files are megabytes: written only when missing (first start, Redis restart).
        have_bundle = await self.redis.exists(bundle)
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            if not have_bundle:
                pipe.hset(bundle, mapping=self._tokenizer_files)  # type: ignore[arg-type]
            pipe.expire(bundle, s.job_ttl_seconds)
            pipe.set(keys.model_card(s.model_name), self.card.model_dump_json(), ex=s.job_ttl_seconds)
            pipe.set(keys.worker(self.worker_id), info.model_dump_json(), ex=ttl)
            pipe.zadd(keys.WORKERS, {self.worker_id: now})
            pipe.hset(keys.MODELS_SEEN, s.model_name, now)
            await pipe.execute()

    async def _unregister(self) -> None:
        assert self.redis is not None
        try:
            await self.redis.zrem(keys.WORKERS, self.worker_id)
            await self.redis.delete(keys.worker(self.worker_id))
        except (RedisError, OSError):
            pass

    async def _heartbeat(self) -> None:
        """Refresh the registration and the leases of the jobs this worker runs."""
        assert self.store is not None
        while not self.dead:
            try:
                await self._register()
                lost = await self.store.renew(self.worker_id, dict(self._inflight), self.settings.lease_seconds)
                for job_id in lost:
                    self._on_lost(job_id)
            except (RedisError, OSError) as exc:
                # Redis is away: register again as soon as it is back, so the API sees
                # this worker (and its model) at once after a Redis restart.
                log.warning("heartbeat failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def _listen_cancellations(self) -> None:
        assert self.redis is not None
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(keys.CANCEL_CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message:
                    await self._abort(message["data"].decode())

    async def _poll_cancellations(self) -> None:
        """Backstop for a cancel announcement this worker missed (e.g. while reconnecting)."""
        assert self.store is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                for job_id in await self.store.cancel_requested(list(self._inflight)):
                    await self._abort(job_id)
            except RedisError as exc:
                log.warning("cancel poll failed: %s", exc)

    async def _watch_engine(self) -> None:
        while not self.engine.alive():
            await asyncio.sleep(0.5)
        while self.engine.alive():
            await asyncio.sleep(1.0)
        self.fail_fast("the engine died")

    def fail_fast(self, why: str) -> None:
        """The engine is gone: stop taking jobs at once (tasks arriving now are refused),
        give back the ones held, unregister and exit (on the loop, in the background)."""
        if self.dead:
            return
        self.dead = True
        self.loop.create_task(self._die(why))

    async def _die(self, why: str) -> None:
        log.critical("%s: giving back %d job(s) and exiting", why, len(self._inflight))
        # Every job still listed, and those whose own clean-up is giving them back right
        # now: none may be left to a lapsing lease. Their messages are left to the reaper
        # of another process, due once this one has gone (DYING_RESEND_DELAY_SECONDS):
        # sent from here, or by another process while this one is still leaving, this
        # worker's consumer could pop them on its way out and lose them.
        for job_id, attempt in list(self._inflight.items()):
            await self._release(job_id, attempt)
        await asyncio.gather(*list(self._releasing.values()), return_exceptions=True)
        await self._unregister()
        self._on_fatal(EXIT_ENGINE_DEAD)

    async def _release(self, job_id: str, attempt: int) -> bool:
        """Give a job back to the queue and send its message again (once: a second caller,
        e.g. a dying worker, waits for the first). If Redis cannot be reached, its lease
        lapses and the reaper does it. True if it was given back (not: it was not ours)."""
        task = self._releasing.get(job_id)
        if task is None:
            task = asyncio.ensure_future(self._give_back(job_id, attempt))
            self._releasing[job_id] = task
            task.add_done_callback(lambda _: self._releasing.pop(job_id, None))
        return await asyncio.shield(task)

    async def _give_back(self, job_id: str, attempt: int) -> bool:
        assert self.store is not None
        send = not self.dead
        try:
            assert self.redis is not None
            raw_model, batch, owner = await self.redis.hmget(keys.job(job_id), ["model", "batch", "owner"])
            model = keys.text(raw_model) if raw_model else self.settings.model_name
            due_in = None if send else DYING_RESEND_DELAY_SECONDS
            if await self.store.release(job_id, model, attempt, self.worker_id, due_in=due_in) != 2:
                return False
            # Logs (issue 9): why: the engine died, the job's log is not where this attempt
            # left it (Redis lost writes), or an error before its end was written.
            why = "engine_died" if self.dead else "log_mismatch" if job_id in self._lost else "error"
            log_event(
                log,
                "job.released",
                level=logging.WARNING,
                job_id=job_id,
                model=model,
                key_id=keys.text(owner) if owner else None,
                batch_id=keys.text(batch) if batch else None,
                attempt=attempt,
                worker=self.worker_id,
                why=why,
            )
            if send:
                await self._requeue(job_id, model, priority_of(keys.text(batch) if batch else None))
            return True
        except (RedisError, OSError, ServiceError) as exc:
            log_event(
                log,
                "job.release_failed",
                level=logging.WARNING,
                job_id=job_id,
                attempt=attempt,
                worker=self.worker_id,
                error=str(exc),
                note="its lease will lapse",
            )
            return False

    async def _abort(self, job_id: str) -> None:
        if job_id in self._inflight and job_id not in self._cancelled:
            log_event(
                log,
                "job.aborting",
                **self._log_fields.get(job_id, {"job_id": job_id}),
                attempt=self._inflight[job_id],
                why="cancel_requested",
            )
            self._cancelled.add(job_id)
            await self.engine.abort(job_id)

    async def _run_job(self, job_id: str) -> dict[str, Any]:
        assert self.store is not None and self.publisher is not None
        if timing.ENABLED:
            timing.stamp(job_id, "loop")
        if self.dead:
            return {"status": "refused", "started": False}
        token = new_claim_token()
        record: JobRecord | None = None
        try:
            claimed, record = await self.store.claim_record(
                job_id, self.settings.model_name, self.worker_id, token, self.settings.lease_seconds
            )
        except (RedisError, OSError):
            # Whether the claim ran is unknown (a reply lost): claim again with the same
            # token (the same attempt if it did); the record is then read as part of the
            # attempt, where an error gives the job back.
            claimed = await self.store.claim(
                job_id, self.settings.model_name, self.worker_id, token, self.settings.lease_seconds
            )
        if timing.ENABLED:
            timing.stamp(job_id, "claimed")
        if isinstance(claimed, str):
            # Cancelled while queued, already run or running (a duplicate message), or expired.
            log_event(log, "job.not_started", job_id=job_id, model=self.settings.model_name, reason=claimed)
            return {"status": claimed, "started": False}
        attempt = claimed
        # From here on, every way out ends the job or gives it back.
        self._inflight[job_id] = attempt
        outcome: dict[str, Any] | None = None
        try:
            outcome = await self._attempt(job_id, attempt, record)
            return outcome or {"status": "released", "attempt": attempt}
        finally:
            lost = job_id in self._lost
            given_back = False
            if outcome is None or lost:
                # An error before the end was written, or the job went astray (its log
                # shorter than what was sent: Redis lost writes). Give it back: a new
                # attempt continues from what the log holds. Refused if it is not ours.
                # (Still listed in _inflight meanwhile: a worker dying now gives it back too.)
                self.publisher.forget(job_id)
                given_back = await self._release(job_id, attempt)
            metrics.JOBS.labels(self.settings.model_name, _outcome_label(outcome, given_back)).inc()
            self._inflight.pop(job_id, None)
            self._log_fields.pop(job_id, None)  # logs (issue 9)
            self._cancelled.discard(job_id)
            self._lost.discard(job_id)
            if timing.ENABLED:
                timing.flush(self.redis, job_id)

    async def _attempt(self, job_id: str, attempt: int, record: JobRecord | None) -> dict[str, Any] | None:
        """Run a claimed attempt (`record`: as read with the claim); its outcome, or None
        if it lost the job on the way."""
        assert self.store is not None and self.publisher is not None
        if record is None:
            record = await self.store.get(job_id)
        if record is None or record.request is None:
            return {"status": "missing"}
        plan = plan_attempt(record.request, await self.store.log(job_id) if attempt > 1 else [])
        # Logs (issue 9): queue_wait_s: claimed (started) minus when it last entered the queue.
        self._log_fields[job_id] = job_fields(record)
        log_event(
            log,
            "job.started",
            **job_fields(record),
            attempt=attempt,
            worker=self.worker_id,
            queue_wait_s=(record.started or time.time()) - (record.queued_at or record.created),
            prompt_tokens=record.request.prompt_tokens,
            max_tokens=record.request.sampling.max_tokens,
            continued_tokens=sum(plan.tokens.values()) or None,
        )
        self.publisher.begin(job_id, plan.next_seq)
        texts = {i: list(t) for i, t in plan.texts.items()}
        tokens = dict(plan.tokens)
        finish: dict[int, str] = dict(plan.finished)
        # Rich jobs: each choice's whole message and its logprobs, for the result.
        messages: dict[int, dict[str, Any]] = {}
        logprobs: dict[int, dict[str, Any]] = {}
        # vLLM's extensions on the result: stop reasons, prompt logprobs (completions).
        extras: dict[int, dict[str, Any]] = {}
        try:
            if plan.request.sampling.max_tokens > 0 and not plan.finished:
                if timing.ENABLED:
                    timing.stamp(job_id, "engine_in")
                async for deltas in self.engine.generate(job_id, plan.request):
                    if timing.ENABLED:
                        timing.stamp(job_id, "engine_first")
                    for d in deltas:
                        texts.setdefault(d.index, []).append(d.text)
                        tokens[d.index] = tokens.get(d.index, 0) + len(d.token_ids)
                        if d.finish_reason:
                            finish[d.index] = d.finish_reason
                        if d.message is not None:
                            messages[d.index] = d.message
                            d.message = None  # the result's, not the stream's
                        if d.logprobs:
                            logprobs[d.index] = extend_logprobs(logprobs.get(d.index), d.logprobs)
                        if d.stop_reason is not None:
                            extras.setdefault(d.index, {})["stop_reason"] = d.stop_reason
                        if d.prompt_logprobs is not None:
                            extras.setdefault(d.index, {})["prompt_logprobs"] = d.prompt_logprobs
                            d.prompt_logprobs = None  # the result's, not the stream's
                    self.publisher.delta(job_id, attempt, deltas)
            elif not plan.finished:
                finish[0] = "length"
                self.publisher.delta(job_id, attempt, [ChoiceDelta(index=0, finish_reason="length")])
        except Exception as exc:
            if not self.engine.alive():
                # Not the job's fault: give it back (the finally in _run_job) and go.
                self.fail_fast(f"the engine died running {job_id}")
                return None
            return await self._fail(record, attempt, exc)
        if job_id in self._lost:
            return None
        return await self._complete(record, attempt, texts, tokens, finish, messages, logprobs, extras)

    async def _fail(self, record: JobRecord, attempt: int, exc: Exception) -> dict[str, Any]:
        assert self.publisher is not None
        error = (
            InvalidRequestError(str(exc))
            if isinstance(exc, EngineRequestError)
            else exc
            if isinstance(exc, ServiceError)
            else EngineError(f"generation failed: {exc}")
        )
        fields = {"status": JobStatus.failed.value, "finished": time.time(), "error": error.to_dict()["error"]}
        owned = await self.publisher.finish(
            record.id,
            attempt,
            "error",
            error=error.to_dict(),
            fields=fields,
            batch=record.batch,
            owner=record.owner,
            started=record.started,
        )
        # Logs (issue 9): the end, with the traceback of an engine failure (not of a request
        # the engine refused). The message is the engine's, as the client gets it.
        self._log_end(
            record,
            attempt,
            JobStatus.failed if owned else None,
            float(fields["finished"]),  # type: ignore[arg-type]
            error_code=error.code,
            error=error.message[:500],
            exc_info=exc if not isinstance(exc, EngineRequestError) else None,
        )
        if owned:
            JOBS_ENDED.labels(self.settings.model_name, JobStatus.failed.value, error.code or "").inc()
        return {"status": "failed" if owned else "lost", "error": error.message}

    async def _complete(
        self,
        record: JobRecord,
        attempt: int,
        texts: dict[int, list[str]],
        tokens: dict[int, int],
        finish: dict[int, str],
        messages: dict[int, dict[str, Any]] | None = None,
        logprobs: dict[int, dict[str, Any]] | None = None,
        extras: dict[int, dict[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        assert self.publisher is not None and record.request is not None
        job_id = record.id
        cancelled = job_id in self._cancelled
        prompt = record.request.prompt_tokens
        completion = sum(tokens.values())
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        status = JobStatus.cancelled if cancelled else JobStatus.completed
        result = JobResult(
            choices=[
                ChoiceResult(
                    index=i,
                    text="".join(texts.get(i, [])),
                    finish_reason=finish.get(i),
                    message=(messages or {}).get(i),
                    logprobs=(logprobs or {}).get(i),
                    **(extras or {}).get(i, {}),
                )
                for i in range(record.request.choices)
            ]
        )
        fields = {
            "status": status.value,
            "finished": time.time(),
            "usage": usage.model_dump(),
            "result": result.model_dump(),
        }
        owned = await self.publisher.finish(
            job_id,
            attempt,
            "done",
            usage=usage,
            fields=fields,
            batch=record.batch,
            owner=record.owner,
            started=record.started,
        )
        # Logs (issue 9): the end, with the usage the client gets (completion text only
        # with LOG_PROMPTS=true).
        self._log_end(
            record,
            attempt,
            status if owned else None,
            float(fields["finished"]),  # type: ignore[arg-type]
            prompt_tokens=prompt,
            completion_tokens=completion,
            finish_reasons=[finish.get(i) for i in range(record.request.choices)],
            completion=[c.text for c in result.choices] if self.settings.log_prompts else None,
        )
        if not owned:
            return None
        JOBS_ENDED.labels(self.settings.model_name, status.value, "").inc()
        return {
            "status": status.value,
            "attempt": attempt,
            "finish_reasons": [finish.get(i) for i in sorted(finish)],
            "usage": usage.model_dump(),
        }

    def _log_end(
        self, record: JobRecord, attempt: int, status: JobStatus | None, finished: float, **fields: Any
    ) -> None:
        """Logs (issue 9): `job.ended` (status None: the end was refused, the job is no
        longer this attempt's: `job.lost`). duration_s: this attempt; total_s: since created."""
        if status is None:
            log_event(
                log,
                "job.lost",
                level=logging.WARNING,
                **job_fields(record),
                attempt=attempt,
                worker=self.worker_id,
                why="its end was refused: another attempt or the reaper has it",
            )
            return
        log_event(
            log,
            "job.ended",
            level=logging.ERROR if fields.get("exc_info") is not None else logging.INFO,
            **job_fields(record),
            status=status,
            attempt=attempt,
            worker=self.worker_id,
            duration_s=finished - (record.started or finished),
            total_s=finished - record.created,
            by="worker",
            **fields,
        )

    def _on_lost(self, job_id: str) -> None:
        """The job is no longer ours (another attempt, or the reaper, has it), or its log
        is not where we left it: stop generating."""
        if job_id in self._inflight and job_id not in self._lost:
            log_event(
                log,
                "job.lost",
                level=logging.WARNING,
                **self._log_fields.get(job_id, {"job_id": job_id}),
                attempt=self._inflight[job_id],
                worker=self.worker_id,
                why="no longer ours (taken back or its log moved); aborting it",
            )
            self._lost.add(job_id)
            asyncio.get_running_loop().create_task(self.engine.abort(job_id))


def _outcome_label(outcome: dict[str, Any] | None, given_back: bool) -> str:
    """How a claimed job left this worker, for `llmq_worker_jobs_total` (worker/metrics.py):
    the end it wrote, else given back to the queue (released), else lost (another
    attempt or the reaper had it, or its record was gone)."""
    status = outcome.get("status") if outcome is not None else None
    if status in ("completed", "failed", "cancelled"):
        return str(status)
    return "released" if given_back else "lost"


@dataclass
class AttemptPlan:
    """Where an attempt starts. A retry of a continuable job (one plain choice) continues
    the answer from the tokens earlier attempts already sent (prompt + those tokens,
    fewer to go), so a client sees the rest of the answer and nothing twice. Other jobs
    (several choices; parser or grammar state: tools, structured output, reasoning,
    logprobs) start over; a reader that already had some of the answer gets an error
    instead of text mixed from two attempts (api.endpoints.chat)."""

    request: JobRequest
    next_seq: int
    texts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)


def outcome(result: dict[str, Any]) -> str:
    """A task's result as Celery keeps it (its task-succeeded event: Flower's Result):
    key=value text, e.g. `status=completed attempt=1 finish=length prompt_tokens=30
    completion_tokens=64`. Celery writes `repr` of what a task returns with a pure-Python
    walker (80 us a job for the runtime's dict, 4 us for a string)."""
    parts = []
    for name, value in result.items():
        if name == "usage" and isinstance(value, dict):
            parts += [f"{k}={v}" for k, v in value.items() if k in ("prompt_tokens", "completion_tokens")]
        elif name == "finish_reasons" and isinstance(value, list):
            parts.append("finish=" + ",".join(str(v) for v in value))
        elif isinstance(value, dict):  # a group's counts
            parts += [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, bool):
            parts.append(f"{name}={str(value).lower()}")
        else:
            text = str(value)
            parts.append(f"{name}={json.dumps(text) if not text or ' ' in text else text}")
    return " ".join(parts)


def plan_attempt(request: JobRequest, previous: list[ChunkEvent]) -> AttemptPlan:
    """The plan of an attempt after `previous` events. A first attempt (or one that starts
    over) runs the request as it is: nothing downstream changes it, and a deep copy of
    every request cost the worker 30 us for a short prompt and 0.6 ms for 2,000 tokens.
    A continued attempt gets a new request (prompt + the tokens sent, fewer to go)."""
    plan = AttemptPlan(request, next_seq=len(previous))
    if not previous or not request.continuable:
        return plan
    sent: list[int] = []
    text: list[str] = []
    for event in previous:
        for c in event.choices:
            sent.extend(c.token_ids)
            text.append(c.text)
            if c.finish_reason:
                plan.finished[0] = c.finish_reason
    sampling = request.sampling.model_copy(
        update={
            "max_tokens": request.sampling.max_tokens - len(sent),
            "min_tokens": max(0, request.sampling.min_tokens - len(sent)),
        }
    )
    plan.request = request.model_copy(
        update={"prompt_token_ids": request.prompt_token_ids + sent, "sampling": sampling}
    )
    plan.texts = {0: "".join(text)}
    plan.tokens = {0: len(sent)}
    return plan
