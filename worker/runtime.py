"""The worker runtime: one engine on one long-lived event loop, shared by all task slots.

Celery runs the worker's tasks in threads (one per slot). Each task hands its job id to
`WorkerRuntime.run_job`, which runs the job as a coroutine on the runtime's loop, where
the engine lives; so every job the worker holds sits in the same engine batch. The
runtime also publishes chunk events, keeps the worker's registration alive, and aborts
jobs that are cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import keys
from common.errors import EngineError, InvalidRequestError, ServiceError
from common.jobs import (
    ChoiceDelta,
    ChoiceResult,
    ChunkEvent,
    JobRequest,
    JobResult,
    JobStatus,
    ModelCard,
    SamplingSpec,
    WorkerInfo,
)
from common.jobstore import JobStore
from common.reaper import Reaper, Requeue
from common.schemas import Usage
from common.settings import Settings
from worker.engine import Engine, EngineRequestError
from worker.publisher import ChunkPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerRuntime:
    def __init__(self, settings: Settings, engine: Engine, worker_id: str, requeue: Requeue):
        self.settings = settings
        self._requeue = requeue
        self.engine = engine
        self.worker_id = worker_id
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._tasks: list[asyncio.Task[Any]] = []
        self._inflight: dict[str, int] = {}  # job id -> attempt
        self._cancelled: set[str] = set()
        self._lost: set[str] = set()
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
        """Run one job to its end; blocks the calling task thread, not the engine."""
        return self._call(self._run_job(job_id))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- on the loop ------------------------------------------------------------------

    async def _start(self) -> None:
        self.redis = aioredis.from_url(self.settings.redis_url, health_check_interval=10)
        await self.engine.start()
        self._tokenizer_files = self.engine.tokenizer_files()
        digest = hashlib.sha256()
        for name in sorted(self._tokenizer_files):
            digest.update(name.encode() + b"\0" + self._tokenizer_files[name] + b"\0")
        self.card = ModelCard(
            name=self.settings.model_name,
            max_model_len=self.engine.max_model_len,
            tokenizer_digest=digest.hexdigest()[:32],
            created=int(time.time()),
        )
        self.store = JobStore(self.redis, self.settings.job_ttl_seconds)
        self.publisher = ChunkPublisher(self.store, self.worker_id, on_lost=self._on_lost)
        await self._register()
        reaper = Reaper(
            self.store,
            self._requeue,
            worker_ttl_seconds=self.settings.worker_ttl_seconds,
            max_attempts=self.settings.max_attempts,
            interval_seconds=self.settings.reaper_interval_seconds,
        )
        for factory in (
            self.publisher.run,
            self._heartbeat,
            self._listen_cancellations,
            self._poll_cancellations,
            reaper.run,
        ):
            self._tasks.append(asyncio.create_task(self._forever(factory)))

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.redis is not None:
            try:
                await self.redis.zrem(keys.WORKERS, self.worker_id)
                await self.redis.delete(keys.worker(self.worker_id))
            except RedisError:
                pass
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
            except Exception:
                log.exception("%s failed; restarting in 1 s", getattr(factory, "__name__", factory))
                await asyncio.sleep(1)

    async def _register(self) -> None:
        assert self.redis is not None and self.card is not None
        s = self.settings
        info = WorkerInfo(id=self.worker_id, model=s.model_name, slots=s.worker_slots, started=self._started)
        ttl = max(1, int(s.worker_ttl_seconds))
        bundle = keys.tokenizer_bundle(self.card.tokenizer_digest)
        # The tokenizer files are megabytes: written only when missing (first start, Redis restart).
        have_bundle = await self.redis.exists(bundle)
        async with self.redis.pipeline(transaction=True) as pipe:
            if not have_bundle:
                pipe.hset(bundle, mapping=self._tokenizer_files)  # type: ignore[arg-type]
            pipe.expire(bundle, s.job_ttl_seconds)
            pipe.set(keys.model_card(s.model_name), self.card.model_dump_json(), ex=s.job_ttl_seconds)
            pipe.set(keys.worker(self.worker_id), info.model_dump_json(), ex=ttl)
            pipe.zadd(keys.WORKERS, {self.worker_id: time.time()})
            await pipe.execute()

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self._register()
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

    async def _abort(self, job_id: str) -> None:
        if job_id in self._inflight and job_id not in self._cancelled:
            log.info("cancelling %s", job_id)
            self._cancelled.add(job_id)
            await self.engine.abort(job_id)

    async def _run_job(self, job_id: str) -> dict[str, Any]:
        assert self.store is not None and self.publisher is not None
        claimed = await self.store.claim(job_id, self.worker_id)
        if isinstance(claimed, str):
            # Cancelled while queued, already run (a redelivered message), or expired.
            log.info("job %s not started: %s", job_id, claimed)
            return {"status": claimed, "started": False}
        attempt = claimed
        record = await self.store.get(job_id)
        if record is None or record.request is None:
            return {"status": "missing"}
        plan = plan_attempt(record.request, await self.store.log(job_id) if attempt > 1 else [])
        self.publisher.begin(job_id, plan.next_seq)
        texts = {i: list(t) for i, t in plan.texts.items()}
        tokens = dict(plan.tokens)
        finish: dict[int, str] = dict(plan.finished)
        self._inflight[job_id] = attempt
        try:
            if plan.sampling.max_tokens > 0 and not plan.finished:
                async for deltas in self.engine.generate(job_id, plan.prompt_token_ids, plan.sampling):
                    for d in deltas:
                        texts.setdefault(d.index, []).append(d.text)
                        tokens[d.index] = tokens.get(d.index, 0) + len(d.token_ids)
                        if d.finish_reason:
                            finish[d.index] = d.finish_reason
                    self.publisher.delta(job_id, attempt, deltas)
            elif not plan.finished:
                finish[0] = "length"
                self.publisher.delta(job_id, attempt, [ChoiceDelta(index=0, finish_reason="length")])
        except Exception as exc:
            error = (
                InvalidRequestError(str(exc))
                if isinstance(exc, EngineRequestError)
                else exc
                if isinstance(exc, ServiceError)
                else EngineError(f"generation failed: {exc}")
            )
            if not isinstance(exc, EngineRequestError):
                log.exception("job %s failed", job_id)
            fields = {"status": JobStatus.failed.value, "finished": time.time(), "error": error.to_dict()["error"]}
            await self.publisher.finish(
                job_id, attempt, "error", error=error.to_dict(), fields=fields, batch=record.batch
            )
            return {"status": "failed", "error": error.message}
        finally:
            self._inflight.pop(job_id, None)
        if job_id in self._lost:
            self._lost.discard(job_id)
            self._cancelled.discard(job_id)
            self.publisher.forget(job_id)
            return {"status": "lost", "attempt": attempt}
        cancelled = job_id in self._cancelled
        self._cancelled.discard(job_id)
        prompt = len(record.request.prompt_token_ids)
        completion = sum(tokens.values())
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        status = JobStatus.cancelled if cancelled else JobStatus.completed
        result = JobResult(
            choices=[
                ChoiceResult(index=i, text="".join(texts.get(i, [])), finish_reason=finish.get(i))
                for i in range(record.request.sampling.n)
            ]
        )
        fields = {
            "status": status.value,
            "finished": time.time(),
            "usage": usage.model_dump(),
            "result": result.model_dump(),
        }
        owned = await self.publisher.finish(job_id, attempt, "done", usage=usage, fields=fields, batch=record.batch)
        return {
            "status": status.value if owned else "lost",
            "attempt": attempt,
            "finish_reasons": [finish.get(i) for i in sorted(finish)],
            "usage": usage.model_dump(),
        }

    def _on_lost(self, job_id: str) -> None:
        """Another attempt owns the job now (or its record is gone): stop generating."""
        if job_id in self._inflight and job_id not in self._lost:
            log.warning("job %s is no longer ours; aborting it", job_id)
            self._lost.add(job_id)
            asyncio.get_running_loop().create_task(self.engine.abort(job_id))


@dataclass
class AttemptPlan:
    """Where an attempt starts. A retry of a single-choice job continues the answer from
    the tokens earlier attempts already sent (prompt + those tokens, fewer to go), so a
    client sees the rest of the answer and nothing twice. Jobs with several choices
    start over."""

    prompt_token_ids: list[int]
    sampling: SamplingSpec
    next_seq: int
    texts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)


def plan_attempt(request: JobRequest, previous: list[ChunkEvent]) -> AttemptPlan:
    plan = AttemptPlan(list(request.prompt_token_ids), request.sampling.model_copy(), next_seq=len(previous))
    if not previous or request.sampling.n != 1:
        return plan
    sent: list[int] = []
    text: list[str] = []
    for event in previous:
        for c in event.choices:
            sent.extend(c.token_ids)
            text.append(c.text)
            if c.finish_reason:
                plan.finished[0] = c.finish_reason
    plan.prompt_token_ids += sent
    plan.sampling.max_tokens = request.sampling.max_tokens - len(sent)
    plan.sampling.min_tokens = max(0, request.sampling.min_tokens - len(sent))
    plan.texts = {0: "".join(text)}
    plan.tokens = {0: len(sent)}
    return plan
