"""JobQueue: hands job ids to the model workers through Celery. The API queues new jobs
with it, and the reaper (in API processes and workers) re-queues those of lost workers.

It sends the task by name, so nothing here imports the worker's code; the job id is both
the task id and its only argument.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from common import keys
from common.broker import captured_commands
from common.errors import ServiceUnavailableError
from common.redis_client import broker_settings, connect

# A send that has had no answer from Redis this long fails (and is retried, then refused
# with a 503): without it a half-open connection (dropped by a NAT or a proxy) left a send
# hanging until TCP gave up, and with it every message queued behind it in the API's
# message groups (api.jobs.pipeline.MessageGroups).
SEND_TIMEOUT_SECONDS = 10.0


class JobQueue:
    """Celery builds each job's message (and its task-sent event, for Flower) as always,
    byte for byte; the commands that would carry them to Redis (LPUSH to the queue's list,
    PUBLISH of the event) are kept (`common.broker.captured_commands`) and sent with an
    asyncio Redis client, in one pipeline, on the caller's event loop. (Before, every send
    went through a thread and kombu's blocking client: the thread waited for the
    interpreter lock while the API's event loop was busy, 10 to 35 ms at the median under
    8 to 32 streams on the real engine, and cost CPU a job; issue 12.) Building a message
    does no I/O: the producer's channel is made (and pinged) once, in a thread."""

    def __init__(self, redis_url: str, visibility_timeout: int, send_timeout: float = SEND_TIMEOUT_SECONDS):
        self.redis_url = redis_url
        self.send_timeout = send_timeout
        self.app = Celery("llmq-api")
        self.app.conf.update(
            # llmq's transport: its channel keeps what it would send (TLS, Sentinel as set).
            **broker_settings(
                redis_url,
                keys.broker_transport_options(visibility_timeout)
                | {"socket_timeout": send_timeout, "socket_connect_timeout": send_timeout},
                "common.broker:Transport",
            ),
            task_send_sent_event=True,  # Flower shows jobs from the moment they are queued
            task_ignore_result=True,
            # JSON only (as the workers accept): the message is the job id, nothing else.
            accept_content=["json"],
            task_serializer="json",
            event_serializer="json",
            broker_connection_retry_on_startup=True,
        )
        # The asyncio client, for the event loop it was made on (an API process has one;
        # tests run several).
        self._client: tuple[asyncio.AbstractEventLoop, aioredis.Redis] | None = None
        self._warm = False
        self._warming = threading.Lock()

    def _messages(self, job_ids: list[str], model: str, priority: int) -> list[tuple[str, tuple[Any, ...]]]:
        """The Redis commands that queue the jobs' messages (no I/O once warm)."""
        with (
            captured_commands() as commands,
            self.app.producer_or_acquire() as producer,
            producer.batch(max_size=4 * len(job_ids) + 4),
        ):
            for job_id in job_ids:
                self.app.send_task(
                    keys.CHAT_TASK,
                    args=[job_id],
                    task_id=job_id,
                    queue=keys.chat_queue_entity(model),
                    priority=priority,
                    producer=producer,
                )
        return commands

    def _warm_up(self) -> None:
        # The producer's channel is made, and pinged, on first use: here, in a thread.
        with self._warming:
            if not self._warm:
                self._messages(["warm-up"], "warm-up", keys.CHAT_PRIORITY)
                self._warm = True

    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            client = connect(self.redis_url, socket_timeout=self.send_timeout, socket_connect_timeout=self.send_timeout)
            self._client = (loop, client)
        return self._client[1]

    async def submit(self, job_id: str, model: str, priority: int = keys.CHAT_PRIORITY) -> None:
        await self.submit_many([job_id], model, priority)

    async def submit_many(self, job_ids: list[str], model: str, priority: int = keys.CHAT_PRIORITY) -> None:
        """Queue a group of one model's jobs in one round trip (a batch's lines, or the
        API's message groups). Should it fail, whether each message went out is unknown:
        the caller sends again (a job is claimed once; the sweeper resends the messages of
        jobs still queued)."""
        if not job_ids:
            return
        try:
            if not self._warm:
                await anyio.to_thread.run_sync(self._warm_up)
            commands = self._messages(job_ids, model, priority)
            async with self._redis().pipeline(transaction=False) as pipe:
                for name, args in commands:
                    getattr(pipe, name)(*args)
                await pipe.execute()
        except (KombuError, RedisError, OSError) as exc:
            raise ServiceUnavailableError(f"could not queue the job: {exc}") from exc

    def close(self) -> None:
        self.app.close()

    async def aclose(self) -> None:
        """Close the asyncio client (on the loop it was made on), then the Celery app."""
        if self._client is not None and self._client[0] is asyncio.get_running_loop():
            await self._client[1].aclose()
        self._client = None
        self.close()
