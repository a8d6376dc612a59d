"""`common.tasks.cancel_and_wait`: background tasks end even when a cancellation is lost
(as Python 3.11's `asyncio.wait_for` loses one whose inner future finished at that moment)."""

from __future__ import annotations

import asyncio

import pytest

from common.tasks import cancel_and_wait

pytestmark = pytest.mark.asyncio


def losing_its_first_cancellation(cancels: list[int]):
    async def run() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) == 1:
                    continue  # lost, as a library that swallows it would
                raise

    return run


async def test_every_task_ends_though_one_lost_its_first_cancellation():
    cancels: list[int] = []

    async def failing() -> None:
        raise RuntimeError("boom")

    async def quick() -> str:
        return "done"

    stubborn = asyncio.create_task(losing_its_first_cancellation(cancels)())
    tasks = [
        stubborn,
        asyncio.create_task(failing()),
        asyncio.create_task(quick()),
        asyncio.create_task(asyncio.sleep(3600)),
    ]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(tasks, nudge=0.05), 5)
    assert all(t.done() for t in tasks)
    assert stubborn.cancelled() and len(cancels) == 2  # cancelled again, and that one ended it
    assert tasks[2].result() == "done" and tasks[3].cancelled()


async def test_what_gather_did_waits_forever_for_such_a_task():
    """The pattern it replaces (cancel once, then gather) never returns for that task."""
    cancels: list[int] = []
    stubborn = asyncio.create_task(losing_its_first_cancellation(cancels)())
    await asyncio.sleep(0)
    stubborn.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.gather(stubborn, return_exceptions=True), 0.3)
    await cancel_and_wait([stubborn])
    assert stubborn.cancelled()
