"""Celery tasks: thin wrappers that hand a job id to the worker runtime."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject

from common import keys, timing
from worker.celery_app import app, get_runtime, group_prefetch
from worker.runtime import outcome


@app.task(name=keys.CHAT_TASK)
def chat_completion(job_id: str) -> str:
    """Run one chat completion job; its tokens go out over pub/sub, not as the result."""
    if timing.ENABLED:
        timing.stamp(job_id, "task")
    runtime = get_runtime()
    if runtime.dead and not runtime.started_early(job_id):
        # Leaving: the message goes back to the queue for another worker.
        raise Reject("this worker's engine is dead", requeue=True)
    result = runtime.run_job(job_id)
    if result.get("status") == "refused":  # the engine died before the job could start
        raise Reject("this worker's engine is dead", requeue=True)
    return outcome(result)


@app.task(name=keys.CHAT_GROUP_TASK, bind=True)
def chat_group(self: Any, job_ids: list[str]) -> str:
    """Run a group of jobs (a batch's lines) together, as `chat_completion` runs one; the
    message is acknowledged once all have ended. While they run, the worker takes that
    many fewer messages (`GroupPrefetch`)."""
    task_id = self.request.id
    try:
        if not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids):
            # Not a message llmq made: dropped (acknowledged), with the reason in the log.
            raise Reject(f"a group's argument must be a list of job ids, not {job_ids!r:.200}", requeue=False)
        if timing.ENABLED:
            for job_id in job_ids:
                timing.stamp(job_id, "task")
        runtime = get_runtime()
        if runtime.dead:
            raise Reject("this worker's engine is dead", requeue=True)
        return outcome(runtime.run_jobs(job_ids, on_end=lambda: group_prefetch.job_ended(task_id)))
    finally:
        group_prefetch.done(task_id)
