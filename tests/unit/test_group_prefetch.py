"""GroupPrefetch (worker/prefetch.py): a group message's k jobs count as k against the
worker's prefetch, on kombu's own thread-safe QoS counter (as Celery's consumer holds it),
given back one as each job ends and the rest when its task ends."""

from __future__ import annotations

from types import SimpleNamespace

from kombu.common import QoS

from common import keys
from worker.prefetch import GroupPrefetch


def consumer(prefetch: int) -> SimpleNamespace:
    qos = QoS(lambda prefetch_count: None, prefetch)
    qos.update()
    return SimpleNamespace(qos=qos)


def request(task_id: str, name: str, *jobs: str) -> SimpleNamespace:
    return SimpleNamespace(id=task_id, name=name, args=[list(jobs)] if name == keys.CHAT_GROUP_TASK else list(jobs))


def test_a_group_lowers_the_prefetch_by_its_other_jobs_until_they_end():
    c, groups = consumer(8), GroupPrefetch()
    groups.received(sender=c, request=request("g1", keys.CHAT_GROUP_TASK, "a", "b", "c"))
    assert c.qos.value == 6  # the message counts 1, its two other jobs 2 more
    groups.received(sender=c, request=request("t", keys.CHAT_TASK, "x"))
    assert c.qos.value == 6  # an ordinary message changes nothing
    groups.job_ended("g1")
    assert c.qos.value == 7 and groups.held() == 1
    groups.job_ended("g1")
    groups.job_ended("g1")  # the last job: its message's ack frees that one
    assert c.qos.value == 8 and groups.held() == 0
    groups.done("g1")
    assert c.qos.value == 8


def test_what_a_group_still_holds_goes_back_when_its_task_ends():
    c, groups = consumer(8), GroupPrefetch()
    groups.received(sender=c, request=request("g1", keys.CHAT_GROUP_TASK, "a", "b", "c", "d"))
    groups.job_ended("g1")
    groups.done("g1")  # e.g. refused: the worker's engine died
    assert c.qos.value == 8 and groups.held() == 0


def test_the_floor_of_one_is_not_given_back_twice():
    """Celery never lowers a prefetch below 1: what a group could not take off is not
    added back (the prefetch would end above where it started)."""
    c, groups = consumer(4), GroupPrefetch()
    groups.received(sender=c, request=request("g1", keys.CHAT_GROUP_TASK, *"abc"))
    groups.received(sender=c, request=request("g2", keys.CHAT_GROUP_TASK, *"defg"))
    assert c.qos.value == 1
    for task, jobs in (("g1", 3), ("g2", 4)):
        for _ in range(jobs):
            groups.job_ended(task)
        groups.done(task)
    assert c.qos.value == 4


def test_a_malformed_group_changes_nothing():
    c, groups = consumer(8), GroupPrefetch()
    groups.received(sender=c, request=SimpleNamespace(id="g", name=keys.CHAT_GROUP_TASK, args=["not-a-list"]))
    groups.received(sender=c, request=request("g1", keys.CHAT_GROUP_TASK, "only"))
    assert c.qos.value == 8 and groups.held() == 0


def test_a_group_revoked_before_it_ran_gives_its_prefetch_back():
    c, groups = consumer(8), GroupPrefetch()
    groups.received(sender=c, request=request("g1", keys.CHAT_GROUP_TASK, "a", "b", "c"))
    groups.revoked(request=SimpleNamespace(id="g1"))  # Celery's task_revoked: the task's context
    assert c.qos.value == 8 and groups.held() == 0
