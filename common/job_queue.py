"""JobQueue: hands job ids to the model workers through Celery. The API queues new jobs
with it, and the reaper (in API processes and workers) re-queues those of lost workers.

It sends the task by name, so nothing here imports the worker's code; the job id is both
the task id and its only argument.
"""

from __future__ import annotations

import anyio
from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from common import keys
from common.errors import ServiceUnavailableError

# A send that has had no answer from Redis this long fails (and is retried, then refused
# with a 503): without it a half-open connection (dropped by a NAT or a proxy) left a send
# hanging until TCP gave up, and with it every message queued behind it in the API's
# message groups (api.jobs.pipeline.MessageGroups).
SEND_TIMEOUT_SECONDS = 10.0


class JobQueue:
    def __init__(self, redis_url: str, visibility_timeout: int, send_timeout: float = SEND_TIMEOUT_SECONDS):
        self.app = Celery("llmq-api", broker=redis_url)
        self.app.conf.update(
            broker_transport="common.broker:Transport",  # one Redis client, not one a send
            task_send_sent_event=True,  # Flower shows jobs from the moment they are queued
            task_ignore_result=True,
            # JSON only (as the workers accept): the message is the job id, nothing else.
            accept_content=["json"],
            task_serializer="json",
            event_serializer="json",
            broker_connection_retry_on_startup=True,
            broker_transport_options=keys.broker_transport_options(visibility_timeout)
            | {"socket_timeout": send_timeout, "socket_connect_timeout": send_timeout},
        )

    def _send(self, job_id: str, model: str, priority: int) -> None:
        self.app.send_task(
            keys.CHAT_TASK,
            args=[job_id],
            task_id=job_id,
            queue=keys.chat_queue_entity(model),
            priority=priority,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        )

    async def submit(self, job_id: str, model: str, priority: int = keys.CHAT_PRIORITY) -> None:
        try:
            await anyio.to_thread.run_sync(self._send, job_id, model, priority)
        except (OperationalError, OSError) as exc:
            raise ServiceUnavailableError(f"could not queue the job: {exc}") from exc

    def _send_many(self, job_ids: list[str], model: str, priority: int) -> None:
        # One producer, its publishes buffered (kombu's publish batch): the group's
        # messages and their task-sent events go to Redis in one pipeline.
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=4 * len(job_ids) + 4):
            for job_id in job_ids:
                self.app.send_task(
                    keys.CHAT_TASK,
                    args=[job_id],
                    task_id=job_id,
                    queue=keys.chat_queue_entity(model),
                    priority=priority,
                    producer=producer,
                )

    async def submit_many(self, job_ids: list[str], model: str, priority: int = keys.CHAT_PRIORITY) -> None:
        """Queue a group of one model's jobs in one round trip (a batch's lines). Should it
        fail, whether each message went out is unknown: the caller hands the group out
        again (the sweeper resends the messages of jobs still queued)."""
        if not job_ids:
            return
        try:
            await anyio.to_thread.run_sync(self._send_many, job_ids, model, priority)
        except (KombuError, OSError) as exc:
            raise ServiceUnavailableError(f"could not queue the jobs: {exc}") from exc

    def close(self) -> None:
        self.app.close()
