"""`JobPipeline.look`, the API's cheap look at a model's queue before it validates a
request, on a real Redis: it reads the count of waiting jobs at most every
LOOK_CACHE_SECONDS while that count is far from the limit (a round trip a request was
about 4% of the API's CPU under load, issue 12), and every time near or at the limit, so
that a full queue is refused at once and an emptied one is seen at once; a count far from
the limit that has lapsed is read again in the background, without making a request wait."""

from __future__ import annotations

import asyncio

import pytest

from api.jobs import pipeline as pipeline_module
from api.jobs.pipeline import JobPipeline
from common import keys
from common.errors import RateLimitError

pytestmark = pytest.mark.asyncio


class Admission:
    async def queue_limit(self, model: str) -> int:
        return 10

    async def refusal(self, model, code, waiting, max_waiting, headers):
        return RateLimitError(f"{waiting} of {max_waiting} waiting")


def pipeline_on(redis) -> tuple[JobPipeline, list[str]]:
    p = object.__new__(JobPipeline)
    p.redis = redis
    p.admission = Admission()
    p._looked = {}
    p._counting, p._background = set(), set()
    reads: list[str] = []
    zcard = redis.zcard

    async def counting_zcard(name):
        reads.append(name)
        return await zcard(name)

    redis.zcard = counting_zcard
    return p, reads


async def fill(redis, n: int) -> None:
    await redis.delete(keys.waiting("m"))
    if n:
        await redis.zadd(keys.waiting("m"), {f"job-{i}": i for i in range(n)})


async def test_far_from_the_limit_one_read_serves_a_burst(redis, monkeypatch):
    monkeypatch.setattr(pipeline_module, "LOOK_CACHE_SECONDS", 60.0)
    p, reads = pipeline_on(redis)
    await fill(redis, 2)
    for _ in range(20):
        await p.look("m")
    assert len(reads) == 1


async def test_near_or_at_the_limit_every_look_reads(redis, monkeypatch):
    monkeypatch.setattr(pipeline_module, "LOOK_CACHE_SECONDS", 60.0)
    p, reads = pipeline_on(redis)
    await fill(redis, 5)  # half the limit: near it
    await p.look("m")
    await p.look("m")
    assert len(reads) == 2
    await fill(redis, 10)
    with pytest.raises(RateLimitError):
        await p.look("m")
    # Emptied: seen at the next look, not after the cache time.
    await fill(redis, 0)
    await p.look("m")
    assert len(reads) == 4


async def test_a_lapsed_count_far_from_the_limit_is_read_again_without_waiting(redis, monkeypatch):
    """Older than LOOK_CACHE_SECONDS, a count far from the limit is used once more while
    it is read again in the background: the request does not wait for the round trip,
    and the looks after it see the queue as it is now."""
    monkeypatch.setattr(pipeline_module, "LOOK_CACHE_SECONDS", 0.0)
    p, reads = pipeline_on(redis)
    await fill(redis, 0)
    await p.look("m")
    assert len(reads) == 1
    await fill(redis, 10)
    await p.look("m")  # not refused: the count it had was far from the limit
    assert p._background, "no count started in the background"
    await asyncio.gather(*p._background)
    assert len(reads) == 2 and p._looked["m"][1] == 10
    with pytest.raises(RateLimitError):
        await p.look("m")
    assert len(reads) == 3
