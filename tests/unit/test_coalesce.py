"""Coalescer: calls made while a round trip is in flight share the next one."""

from __future__ import annotations

import asyncio

import pytest

from common.coalesce import Coalescer

pytestmark = pytest.mark.asyncio


async def test_a_lone_call_goes_out_at_once_and_calls_meanwhile_share_the_next_batch():
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def run(args: list[int]) -> list[int]:
        batches.append(list(args))
        if len(batches) == 1:
            await release.wait()  # the first round trip is in flight while more calls come
        return [a * 10 for a in args]

    c: Coalescer[int, int] = Coalescer(run)
    first = asyncio.ensure_future(c(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert batches == [[1]]
    more = [asyncio.ensure_future(c(i)) for i in range(2, 7)]
    await asyncio.sleep(0)
    assert batches == [[1]]  # waiting for the one in flight
    release.set()
    assert await first == 10
    assert await asyncio.gather(*more) == [20, 30, 40, 50, 60]
    assert batches == [[1], [2, 3, 4, 5, 6]]


async def test_calls_in_the_same_turn_share_one_batch_up_to_the_limit():
    batches: list[list[int]] = []

    async def run(args: list[int]) -> list[int]:
        batches.append(list(args))
        return args

    c: Coalescer[int, int] = Coalescer(run, limit=4)
    assert await asyncio.gather(*(c(i) for i in range(10))) == list(range(10))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_an_error_fails_its_batch_only_and_a_cancelled_caller_does_not_stop_the_rest():
    calls = 0
    release = asyncio.Event()

    async def run(args: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
            raise ConnectionError("lost")
        return args

    c: Coalescer[int, int] = Coalescer(run)
    failing = [asyncio.ensure_future(c(i)) for i in range(3)]
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(c(i)) for i in range(3, 6)]
    await asyncio.sleep(0)
    later[0].cancel()
    release.set()
    for f in failing:
        with pytest.raises(ConnectionError):
            await f
    assert await asyncio.gather(*later[1:]) == [4, 5]
    assert later[0].cancelled()
    assert calls == 2
    assert await c(9) == 9  # and it goes on
