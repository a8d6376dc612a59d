"""`api.refreshed.Refreshed`: a kept value is used as it is while fresh, used and read
again in the background while stale, and waited for when too old, absent or asked fresh."""

from __future__ import annotations

import asyncio

import pytest

from api.refreshed import Refreshed

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Source:
    """Counts reads; a read answers its number, after `gate` opens if one is set."""

    def __init__(self) -> None:
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def read(self) -> int:
        self.reads += 1
        n, gate = self.reads, self.gate
        if gate is not None:
            await gate.wait()
        if self.fail:
            raise ConnectionError("redis down")
        return n


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refreshed(src: Source, clock: Clock) -> Refreshed[int]:
    return Refreshed(src.read, fresh=1.0, stale=5.0, clock=clock.monotonic)


async def test_fresh_value_is_used_without_a_read(clock):
    src = Source()
    r = refreshed(src, clock)
    assert await r.get() == 1
    clock.now += 0.5
    assert await r.get() == 1
    assert src.reads == 1


async def test_stale_value_is_used_and_read_again_in_the_background(clock):
    src = Source()
    r = refreshed(src, clock)
    assert await r.get() == 1
    clock.now += 2.0
    src.gate = asyncio.Event()
    # Stale: the kept value at once, one read started (not two, however many ask).
    assert await r.get() == 1
    assert await r.get() == 1
    await asyncio.sleep(0)
    assert src.reads == 2
    src.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert r.value == 2
    assert await r.get() == 2
    assert src.reads == 2


async def test_too_old_absent_or_fresh_asked_is_waited_for(clock):
    src = Source()
    r = refreshed(src, clock)
    assert r.value is None
    assert await r.get() == 1
    clock.now += 6.0
    assert await r.get() == 2  # past `stale`: read now
    assert await r.get(fresh=True) == 3
    assert src.reads == 3


async def test_a_failed_background_read_is_quiet_and_the_value_ages_out(clock):
    src = Source()
    r = refreshed(src, clock)
    await r.get()
    src.fail = True
    clock.now += 2.0
    assert await r.get() == 1  # the background read fails, quietly
    await asyncio.sleep(0)
    assert src.reads == 2
    clock.now += 4.0
    with pytest.raises(ConnectionError):
        await r.get()  # too old now: read, and the caller hears of the failure


async def test_a_slow_background_read_does_not_replace_a_newer_value(clock):
    src = Source()
    r = refreshed(src, clock)
    await r.get()
    clock.now += 2.0
    gate = src.gate = asyncio.Event()
    assert await r.get() == 1  # background read 2 starts, waits at the gate
    await asyncio.sleep(0)
    src.gate = None
    clock.now += 0.1
    assert await r.get(fresh=True) == 3  # read 3 starts later, ends first
    gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert src.reads == 3 and r._refresh is not None and r._refresh.done()
    assert r.value == 3
