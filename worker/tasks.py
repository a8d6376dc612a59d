"""Celery tasks: thin wrappers that hand a job id to the worker runtime."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject

from common import keys, timing
from worker.celery_app import app, get_runtime


@app.task(name=keys.CHAT_TASK)
def chat_completion(job_id: str) -> dict[str, Any]:
    """Run one chat completion job; its tokens go out over pub/sub, not as the result."""
    if timing.ENABLED:
        timing.stamp(job_id, "task")
    runtime = get_runtime()
    if runtime.dead:
        # Leaving: the message goes back to the queue for another worker.
        raise Reject("this worker's engine is dead", requeue=True)
    return runtime.run_job(job_id)
