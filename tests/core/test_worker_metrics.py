"""The worker's own metrics (worker/metrics.py) on a real Redis with the fake engine: each
way a claimed job leaves the worker is counted once under its outcome, every terminal
write the worker makes counts in llmq_jobs_ended_total, the in-flight gauge and the
registration follow the jobs held, and the metrics are served where announced."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ConnectionError as RedisConnectionError

from common import keys
from common.jobs import WorkerInfo
from common.settings import Settings
from tests.core.test_worker_runtime import _len_at_least, queued, wait_until
from tests.core.test_worker_runtime import runtime as runtime  # noqa: F401  (the fixture)
from worker import metrics
from worker.engine import EngineRequestError

pytestmark = pytest.mark.asyncio
MODEL = Settings().model_name


class Counts:
    """Samples of the default registry now, to compare with later."""

    def __init__(self) -> None:
        self.before = {key: self.now(*key) for key in self.keys()}

    @staticmethod
    def keys() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
        out = [("llmq_worker_jobs_total", (("model", MODEL), ("outcome", o))) for o in metrics.OUTCOMES]
        for status, code in (("completed", ""), ("failed", ""), ("failed", "engine_error"), ("cancelled", "")):
            out.append(("llmq_jobs_ended_total", (("model", MODEL), ("status", status), ("code", code))))
        out.append(("llmq_worker_publish_seconds_count", (("model", MODEL),)))
        return out

    @staticmethod
    def now(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return REGISTRY.get_sample_value(name, dict(labels)) or 0.0

    def moved(self) -> dict[str, float]:
        """What moved since: `name{label values}` -> by how much (publish count aside)."""
        out = {}
        for key, was in self.before.items():
            name, labels = key
            if name != "llmq_worker_publish_seconds_count" and self.now(*key) != was:
                out[f"{name}{{{','.join(v for k, v in labels if k != 'model')}}}"] = self.now(*key) - was
        return out

    def published(self) -> float:
        key = ("llmq_worker_publish_seconds_count", (("model", MODEL),))
        return self.now(*key) - self.before[key]


async def test_a_completed_job_is_counted_once_with_its_publishes(runtime, redis):  # noqa: F811
    counts = Counts()
    record = await queued(redis, max_tokens=8 * 3)
    assert (await asyncio.to_thread(runtime.run_job, record.id))["status"] == "completed"
    assert counts.moved() == {"llmq_worker_jobs_total{completed}": 1, "llmq_jobs_ended_total{completed,}": 1}
    # Three deltas and the last event: at least one round trip, at most one each.
    assert 1 <= counts.published() <= 4


async def test_a_job_given_back_is_released_and_one_taken_over_is_lost(runtime, redis, monkeypatch):  # noqa: F811
    counts = Counts()
    record = await queued(redis)
    # The claim's reply (with the record) is lost, and reading the record fails too.
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
    assert counts.moved() == {"llmq_worker_jobs_total{released}": 1}

    # Another attempt takes the job over while this one runs: its appends are refused.
    counts = Counts()
    record = await queued(redis, max_tokens=8 * 200)
    running = asyncio.create_task(asyncio.to_thread(runtime.run_job, record.id))
    await wait_until(lambda: _len_at_least(redis, record.id, 1))
    await redis.hset(keys.job(record.id), "attempt", 2)
    assert (await asyncio.wait_for(running, 20))["status"] == "released"  # what run_job answers
    assert counts.moved() == {"llmq_worker_jobs_total{lost}": 1}


async def test_a_failed_job_counts_its_error_code(runtime, redis, monkeypatch):  # noqa: F811
    def failing(exc: Exception):
        async def generate(*_args, **_kw):
            raise exc
            yield  # an async generator

        return generate

    # A request the engine refuses (no code), then a generation that broke (engine_error).
    for exc, code in ((EngineRequestError("prompt too long"), ""), (RuntimeError("boom"), "engine_error")):
        counts = Counts()
        monkeypatch.setattr(runtime.engine, "generate", failing(exc))
        record = await queued(redis)
        assert (await asyncio.to_thread(runtime.run_job, record.id))["status"] == "failed"
        assert counts.moved() == {"llmq_worker_jobs_total{failed}": 1, f"llmq_jobs_ended_total{{failed,{code}}}": 1}


async def test_in_flight_gauge_and_registration_follow_the_jobs_held(runtime, redis):  # noqa: F811
    def in_flight() -> float:
        return REGISTRY.get_sample_value("llmq_worker_jobs_in_flight", {"model": MODEL}) or 0.0

    assert in_flight() == 0
    record = await queued(redis, max_tokens=8 * 100)
    running = asyncio.create_task(asyncio.to_thread(runtime.run_job, record.id))
    await wait_until(lambda: _len_at_least(redis, record.id, 1))
    assert in_flight() == 1

    async def registered_inflight(n: int) -> bool:
        raw = await redis.get(keys.worker(runtime.worker_id))
        return raw is not None and WorkerInfo.model_validate_json(raw).inflight == n

    await wait_until(lambda: registered_inflight(1))
    await asyncio.wait_for(running, 20)
    assert in_flight() == 0
    await wait_until(lambda: registered_inflight(0))


async def test_metrics_are_served_where_announced():
    settings = Settings(worker_metrics_port=0, worker_metrics_host="127.0.0.1", worker_slots=5)
    url = metrics.serve(settings)
    assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    async with httpx.AsyncClient() as client:
        text = (await client.get(url)).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("llmq_worker_slots", (("model", MODEL),))] == 5
    for outcome in metrics.OUTCOMES:
        assert ("llmq_worker_jobs_total", (("model", MODEL), ("outcome", outcome))) in samples


async def test_the_announced_host():
    s = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert metrics.advertised_host(s) == "127.0.0.1"  # the route to Redis
    assert metrics.advertised_host(Settings(worker_metrics_host="10.1.2.3")) == "10.1.2.3"
    assert metrics.advertised_host(Settings(worker_metrics_advertise_host="worker-7")) == "worker-7"
    assert metrics.url_of("::1", 9) == "http://[::1]:9/metrics"
    assert metrics.url_of("worker-7", 9) == "http://worker-7:9/metrics"
