"""Group messages against the worker's prefetch (worker/celery_app.py)."""

from __future__ import annotations

import threading
from typing import Any

from common import keys


class GroupPrefetch:
    """Counts a group message's jobs against the worker's prefetch. Celery counts a
    message as one task, so a worker holding a group of k jobs (`CHAT_GROUP_TASK`) would
    still take a message for every other free slot and its engine would hold k - 1 jobs
    too many. On receipt (in the consumer's thread) the consumer's prefetch count is
    lowered by k - 1 (never below 1: Celery's floor); it goes back up by one as each of
    the group's jobs ends, but for the last (its message's ack frees that one), and what
    is left when the task ends. Thread-safe: jobs end on the engine loop's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._qos: Any = None
        self._held: dict[str, int] = {}  # group task id -> prefetch still lowered for it

    def received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if request is None or request.name != keys.CHAT_GROUP_TASK:
            return
        args = request.args
        jobs = args[0] if isinstance(args, (list, tuple)) and args and isinstance(args[0], list) else []
        qos = getattr(sender, "qos", None)
        if qos is None or len(jobs) < 2:
            return
        with self._lock:
            self._qos = qos
            before = qos.value
            lowered = before - qos.decrement_eventually(len(jobs) - 1)
            if lowered > 0:
                self._held[request.id] = lowered

    def job_ended(self, task_id: str) -> None:
        """One of the group's jobs has ended: one more message may come in."""
        self._give_back(task_id, 1)

    def done(self, task_id: str) -> None:
        """The group's task has ended: the prefetch it still held goes back."""
        self._give_back(task_id, None)

    def revoked(self, request: Any = None, **_: Any) -> None:
        """A task revoked before it ran (an operator, in Flower): a group's prefetch back."""
        if request is not None:
            self.done(request.id)

    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def _give_back(self, task_id: str, n: int | None) -> None:
        with self._lock:
            held = self._held.get(task_id, 0)
            back = held if n is None else min(n, held)
            if back <= 0:
                return
            if held - back:
                self._held[task_id] = held - back
            else:
                del self._held[task_id]
            self._qos.increment_eventually(back)
