"""JobQueue: hands job ids to the model workers through Celery. The API queues new jobs
with it, and the reaper (in API processes and workers) re-queues those of lost workers.

It sends the task by name, so nothing here imports the worker's code; the job id is both
the task id and its only argument (a group of a batch's lines: `chat.group`, whose only
argument is the list of their job ids).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import KombuError
from kombu.utils.json import dumps
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


class _Template:
    """One job's message (LPUSHed to its queue's list) and task-sent event (PUBLISHed for
    Flower) as Celery made them, for a model and a priority. Another job's are the same
    with its id in the places Celery puts it, a new delivery tag each, and (the event)
    the app's next clock tick and the time; nothing else of a job's message depends on
    the job (`tests/core/test_job_queue.py` compares them with Celery's own)."""

    def __init__(self, push: tuple[Any, ...], publish: tuple[Any, ...], message: dict, event: dict, event_body: dict):
        self.push_key, self.channel = push[0], publish[0]
        self.message, self.event, self.event_body = message, event, event_body
        # The body: [args, kwargs, embed]; args is [job id].
        self.body_rest = json.loads(base64.b64decode(message["body"]))[1:]

    @classmethod
    def of(cls, job_id: str, commands: list[tuple[str, tuple[Any, ...]]]) -> _Template | None:
        """The template in Celery's `commands` for `job_id`; None if they are not exactly
        its message and event, with the id where expected."""
        if [name for name, _ in commands] != ["lpush", "publish"]:
            return None
        (_, push), (_, publish) = commands
        try:
            message, event = json.loads(push[1]), json.loads(publish[1])
            body = json.loads(base64.b64decode(message["body"]))
            event_body = json.loads(base64.b64decode(event["body"]))
            headers, properties = message["headers"], message["properties"]
            expected = (
                properties["body_encoding"] == event["properties"]["body_encoding"] == "base64"
                and body[0] == [job_id]
                and headers["id"] == headers["root_id"] == properties["correlation_id"] == job_id
                and headers["argsrepr"] == event_body["args"] == repr([job_id])
                and event_body["uuid"] == event_body["root_id"] == job_id
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        return cls(push, publish, message, event, event_body) if expected else None

    def commands(self, job_id: str, clock: int) -> list[tuple[str, tuple[Any, ...]]]:
        args = repr([job_id])
        message = self.message | {
            "body": _b64json([[job_id], *self.body_rest]),
            "headers": self.message["headers"] | {"id": job_id, "root_id": job_id, "argsrepr": args},
            "properties": self.message["properties"] | {"correlation_id": job_id, "delivery_tag": str(uuid.uuid4())},
        }
        event_body = self.event_body | {
            "clock": clock,
            "uuid": job_id,
            "root_id": job_id,
            "args": args,
            "timestamp": time.time(),
        }
        event = self.event | {
            "body": _b64json(event_body),
            "properties": self.event["properties"] | {"delivery_tag": str(uuid.uuid4())},
        }
        return [("lpush", (self.push_key, dumps(message))), ("publish", (self.channel, dumps(event)))]


def _b64json(value: Any) -> str:
    return base64.b64encode(dumps(value).encode()).decode()


class JobQueue:
    """Each job's message (and its task-sent event, for Flower) is Celery's, byte for byte
    but for its id, delivery tag, clock tick and time: Celery builds the first job's of a
    model and priority, and the rest are made from it (`_Template`). The commands that
    carry them to Redis (LPUSH to the queue's list, PUBLISH of the event) are kept
    (`common.broker.captured_commands`) and sent with an
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
        self._templates: dict[tuple[str, int], _Template] = {}

    def _messages(self, job_ids: list[str], model: str, priority: int) -> list[tuple[str, tuple[Any, ...]]]:
        """The Redis commands that queue the jobs' messages (no I/O once warm): Celery's
        for the first job of a model and priority, then the same made for each job from
        those (`_Template`: Celery's send took about 200 us of the API's CPU a job)."""
        commands: list[tuple[str, tuple[Any, ...]]] = []
        template = self._templates.get((model, priority))
        if template is None:
            first, job_ids = job_ids[0], job_ids[1:]
            commands = self._celery_messages([first], model, priority)
            template = _Template.of(first, commands)
            if template is None:
                # Not of the expected shape (a first send that also declared the queue,
                # say): Celery makes these too, and the next send tries again.
                return commands + (self._celery_messages(job_ids, model, priority) if job_ids else [])
            self._templates[(model, priority)] = template
        for job_id in job_ids:
            commands.extend(template.commands(job_id, self.app.clock.forward()))
        return commands

    def _celery_messages(self, job_ids: list[str], model: str, priority: int) -> list[tuple[str, tuple[Any, ...]]]:
        """The jobs' commands, as Celery's `send_task` makes them."""
        return self._celery_tasks([(keys.CHAT_TASK, job_id, job_id) for job_id in job_ids], model, priority)

    def _celery_tasks(
        self, tasks: list[tuple[str, Any, str]], model: str, priority: int
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """The commands of Celery's `send_task` for each (task name, argument, task id)."""
        with (
            captured_commands() as commands,
            self.app.producer_or_acquire() as producer,
            producer.batch(max_size=4 * len(tasks) + 4),
        ):
            for name, arg, task_id in tasks:
                self.app.send_task(
                    name,
                    args=[arg],
                    task_id=task_id,
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
        API's message groups), a message each. Should it fail, whether each message went
        out is unknown: the caller sends again (a job is claimed once; the sweeper resends
        the messages of jobs still queued)."""
        if job_ids:
            await self._send(lambda: self._messages(job_ids, model, priority))

    async def submit_groups(self, groups: list[list[str]], model: str, priority: int = keys.BATCH_PRIORITY) -> None:
        """Queue one model's jobs with one message a group (`CHAT_GROUP_TASK`, all in one
        round trip): a worker takes a group's jobs together and acknowledges the message
        once they have all ended (a batch's lines: Celery's receive, hand-off and ack
        were about half of a worker's CPU a line when every line had its own message;
        issue 12). A group of one is an ordinary message. Failure: as `submit_many`; a
        group sent twice runs each job once (a job is claimed once)."""
        singles = [g[0] for g in groups if len(g) == 1]
        tasks = [(keys.CHAT_GROUP_TASK, g, f"group-{uuid.uuid4().hex}") for g in groups if len(g) > 1]
        if singles or tasks:
            await self._send(
                lambda: (
                    (self._messages(singles, model, priority) if singles else [])
                    + (self._celery_tasks(tasks, model, priority) if tasks else [])
                )
            )

    async def _send(self, build: Callable[[], list[tuple[str, tuple[Any, ...]]]]) -> None:
        """Send the commands `build` makes (once the producer is warm) in one pipeline."""
        try:
            if not self._warm:
                await anyio.to_thread.run_sync(self._warm_up)
            commands = build()
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
