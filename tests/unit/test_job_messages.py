"""MessageGroups: the Celery messages of jobs queued at about the same time go out
together, each caller learns its own job's outcome."""

from __future__ import annotations

import asyncio

import pytest

from api.jobs.pipeline import MessageGroups
from common.errors import ServiceUnavailableError


class RecordingQueue:
    """JobQueue's sending side: records each call; `fail_groups` / `fail` make them raise."""

    def __init__(self, fail_groups: bool = False, fail: frozenset[str] = frozenset()):
        self.calls: list[tuple[str, list[str], str, int]] = []
        self.fail_groups = fail_groups
        self.fail = fail

    async def submit(self, job_id: str, model: str, priority: int = 0) -> None:
        self.calls.append(("one", [job_id], model, priority))
        await asyncio.sleep(0.01)
        if job_id in self.fail:
            raise ServiceUnavailableError(f"could not queue {job_id}")

    async def submit_many(self, job_ids: list[str], model: str, priority: int = 0) -> None:
        self.calls.append(("many", list(job_ids), model, priority))
        await asyncio.sleep(0.01)
        if self.fail_groups:
            raise ServiceUnavailableError("could not queue the jobs")


async def test_jobs_queued_while_a_message_is_being_sent_go_out_together_per_model_and_priority():
    queue = RecordingQueue()
    groups = MessageGroups(queue)  # type: ignore[arg-type]
    first = asyncio.create_task(groups.send("j0", "m", 0))
    await asyncio.sleep(0)  # j0 is being sent: the next ones gather meanwhile
    rest = [asyncio.create_task(groups.send(f"j{i}", "m", 0)) for i in range(1, 6)]
    other = asyncio.create_task(groups.send("b1", "m", 9))
    await asyncio.gather(first, *rest, other)
    assert queue.calls[0] == ("one", ["j0"], "m", 0)
    assert sorted(queue.calls[1:]) == [("many", ["j1", "j2", "j3", "j4", "j5"], "m", 0), ("one", ["b1"], "m", 9)]
    # Later, alone again: at once, on its own.
    await groups.send("j9", "m", 0)
    assert queue.calls[-1] == ("one", ["j9"], "m", 0)


async def test_a_failed_group_is_sent_job_by_job_and_each_caller_gets_its_own_outcome():
    queue = RecordingQueue(fail_groups=True, fail=frozenset({"j2"}))
    groups = MessageGroups(queue)  # type: ignore[arg-type]
    first = asyncio.create_task(groups.send("j0", "m", 0))
    await asyncio.sleep(0)
    rest = {i: asyncio.create_task(groups.send(f"j{i}", "m", 0)) for i in (1, 2, 3)}
    await first
    await rest[1]
    await rest[3]
    with pytest.raises(ServiceUnavailableError):
        await rest[2]
    assert ("many", ["j1", "j2", "j3"], "m", 0) in queue.calls
    assert {c[1][0] for c in queue.calls if c[0] == "one"} == {"j0", "j1", "j2", "j3"}


async def test_a_caller_that_leaves_does_not_stop_the_others():
    queue = RecordingQueue()
    groups = MessageGroups(queue)  # type: ignore[arg-type]
    first = asyncio.create_task(groups.send("j0", "m", 0))
    await asyncio.sleep(0)
    leaving = asyncio.create_task(groups.send("j1", "m", 0))
    staying = asyncio.create_task(groups.send("j2", "m", 0))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.gather(first, staying)
    assert ("many", ["j1", "j2"], "m", 0) in queue.calls
