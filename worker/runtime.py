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
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common import keys
from common.errors import EngineError, InvalidRequestError, ServiceError
from common.jobs import JobRecord, JobStatus, ModelCard, WorkerInfo
from common.schemas import Usage
from common.settings import Settings
from worker.engine import Engine, EngineRequestError
from worker.publisher import ChunkPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerRuntime:
    def __init__(self, settings: Settings, engine: Engine, worker_id: str):
        self.settings = settings
        self.engine = engine
        self.worker_id = worker_id
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._tasks: list[asyncio.Task[Any]] = []
        self._inflight: set[str] = set()
        self._cancelled: set[str] = set()
        self.redis: aioredis.Redis | None = None
        self.publisher: ChunkPublisher | None = None
        self.card: ModelCard | None = None
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
        self.publisher = ChunkPublisher(self.redis)
        await self._register()
        for factory in (self.publisher.run, self._heartbeat, self._listen_cancellations):
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
        info = WorkerInfo(id=self.worker_id, model=s.model_name, slots=s.worker_slots, started=time.time())
        ttl = max(1, int(s.worker_ttl_seconds))
        bundle = keys.tokenizer_bundle(self.card.tokenizer_digest)
        async with self.redis.pipeline(transaction=True) as pipe:
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
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def _listen_cancellations(self) -> None:
        assert self.redis is not None
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(keys.CANCEL_CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if not message:
                    continue
                job_id = message["data"].decode()
                if job_id in self._inflight:
                    log.info("cancelling %s", job_id)
                    self._cancelled.add(job_id)
                    await self.engine.abort(job_id)

    async def _run_job(self, job_id: str) -> dict[str, Any]:
        assert self.redis is not None and self.publisher is not None
        key = keys.job(job_id)
        raw = await self.redis.hgetall(key)
        if not raw:
            log.warning("job %s has no record (expired?); skipping", job_id)
            return {"status": "missing"}
        record = JobRecord.from_redis(raw)
        if record.status.terminal:
            return {"status": record.status.value}
        assert record.request is not None
        attempt = record.attempt + 1
        await self.redis.hset(
            key,
            mapping={
                "status": JobStatus.in_progress.value,
                "started": str(time.time()),
                "worker": self.worker_id,
                "attempt": str(attempt),
            },
        )
        request = record.request
        tokens: dict[int, int] = {}
        finish: dict[int, str] = {}
        self._inflight.add(job_id)
        try:
            async for deltas in self.engine.generate(job_id, request.prompt_token_ids, request.sampling):
                for d in deltas:
                    tokens[d.index] = tokens.get(d.index, 0) + d.tokens
                    if d.finish_reason:
                        finish[d.index] = d.finish_reason
                self.publisher.delta(job_id, deltas)
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
            # The record first: a client that got the last event then reads the job sees it ended.
            await self._finish_record(key, JobStatus.failed, error=error.to_dict())
            await self.publisher.finish(job_id, "error", error=error.to_dict())
            return {"status": "failed", "error": error.message}
        finally:
            self._inflight.discard(job_id)
        cancelled = job_id in self._cancelled
        self._cancelled.discard(job_id)
        prompt = len(request.prompt_token_ids)
        completion = sum(tokens.values())
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        status = JobStatus.cancelled if cancelled else JobStatus.completed
        await self._finish_record(key, status, usage=usage)
        await self.publisher.finish(job_id, "done", usage=usage)
        return {
            "status": status.value,
            "finish_reasons": [finish.get(i) for i in sorted(finish)],
            "usage": usage.model_dump(),
        }

    async def _finish_record(
        self, key: str, status: JobStatus, *, usage: Usage | None = None, error: dict[str, Any] | None = None
    ) -> None:
        assert self.redis is not None
        fields = {"status": status.value, "finished": str(time.time())}
        if usage is not None:
            fields["usage"] = usage.model_dump_json()
        if error is not None:
            fields["error"] = json.dumps(error.get("error", error))
        await self.redis.hset(key, mapping=fields)
