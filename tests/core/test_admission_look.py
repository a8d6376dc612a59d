"""`JobPipeline.look`, the API's cheap look at a model's queue before it validates a
request, on a real Redis: far from the limit (under half) the count it keeps (a look's,
or what the last submit's admission script answered) is used with no round trip (one a
request was about 4% of the API's CPU under load, issue 12); near or at the limit it
reads the count every time, so that a full queue is refused at once and an emptied one
is seen at once."""

from __future__ import annotations

import pytest

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


async def test_far_from_the_limit_one_read_serves_a_burst(redis):
    p, reads = pipeline_on(redis)
    await fill(redis, 2)
    for _ in range(20):
        await p.look("m")
    assert len(reads) == 1


async def test_near_or_at_the_limit_every_look_reads(redis):
    p, reads = pipeline_on(redis)
    await fill(redis, 5)  # half the limit: near it
    await p.look("m")
    await p.look("m")
    assert len(reads) == 2
    await fill(redis, 10)
    with pytest.raises(RateLimitError):
        await p.look("m")
    # Emptied: seen at the next look.
    await fill(redis, 0)
    await p.look("m")
    assert len(reads) == 4


async def test_a_count_far_from_the_limit_is_kept_until_a_submit_says_otherwise(redis):
    """A stale count far from the limit lets a request through to validation (the
    admission script still refuses it, atomically); the count that script answers
    (`submit` keeps it) makes the next look read again."""
    p, reads = pipeline_on(redis)
    await fill(redis, 0)
    await p.look("m")
    await fill(redis, 10)
    await p.look("m")  # not refused: the count it had was far from the limit
    assert len(reads) == 1
    p._looked["m"] = (10, 10)  # as `submit` keeps a refusal's count (tests/core/test_submit_subscription.py)
    with pytest.raises(RateLimitError):
        await p.look("m")
    assert len(reads) == 2
