"""The Celery app Flower runs with: `celery -A common.flower_app flower` (make run, the
tests, docker compose), so that its Broker page lists every model's queue with its real
depth, for interactive jobs and batch lines apart.

Flower alone gets this wrong (measured: 50 jobs waiting in `chat.<model>`, the page showed
one queue, `celery`, with 0 messages). It lists the queues that the workers it inspected
consume (`active_queues`), but it inspects them once, when it starts: a worker that came
up later (a vLLM worker builds its engine for a minute), a stopped one, or a model with
no live worker at all is left out, and with no worker answering it falls back to its own
app's default queue, `celery`. And it counts a Redis queue by LLEN of each priority list
(kombu names them `<queue>\\x06\\x16<priority>`) of the priority steps in its app's
broker options, which a bare Flower does not know (its defaults happen to include ours).

Here, with Flower 2.2's own code otherwise:
- its app carries our broker transport options (priority steps 0: interactive, 9: batch);
- the queue names are those of every model the service has seen (`llmq:models-seen`,
  kept by the workers' heartbeats) and of the workers Flower inspected, read at each
  page view;
- each queue is a row with all its messages, followed by a row per priority step.
The same goes for Flower's `GET /api/queues/length`. Flower's own `/metrics` is untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery
from flower.utils import broker as flower_broker
from flower.views import BaseHandler

from common import keys
from common.redis_client import broker_settings, sync_client
from common.settings import get_settings

log = logging.getLogger(__name__)
settings = get_settings()

# The broker URL: REDIS_URL here; `celery --broker=...` or CELERY_BROKER_URL take precedence.
app = Celery("llmq-flower")
app.conf.update(
    # kombu's own transport; TLS and Sentinel as configured (Flower's broker page reads
    # the queues with the same settings).
    **broker_settings(settings.redis_url, keys.broker_transport_options(settings.broker_visibility_timeout), None),
    accept_content=["json"],
    event_serializer="json",
    task_serializer="json",
    result_serializer="json",
    broker_connection_retry_on_startup=True,
)

PRIORITY_NAMES = {keys.CHAT_PRIORITY: "interactive", keys.BATCH_PRIORITY: "batch"}


def priority_row_name(queue: str, priority: int) -> str:
    """The Broker page's row for one priority of a queue, e.g. `chat.M · batch (priority 9)`."""
    return f"{queue} · {PRIORITY_NAMES.get(priority, 'priority')} (priority {priority})"


_clients: dict[str, redis.Redis] = {}


def _models_seen(broker_url: str) -> list[str]:
    client = _clients.get(broker_url)
    if client is None:
        # Flower's broker, or with Sentinel (kombu's `sentinel://...` URL), REDIS_URL and the
        # Sentinel settings (TLS as configured either way).
        url = settings.redis_url if broker_url.startswith("sentinel://") else broker_url
        client = _clients[broker_url] = sync_client(url, socket_timeout=2, socket_connect_timeout=1)
    return sorted(keys.text(m) for m in client.hkeys(keys.MODELS_SEEN))


def queue_names(handler: Any) -> list[str]:
    """Every model's queue, and any other queue an inspected worker consumes."""
    names = {q["name"] for info in handler.application.workers.values() for q in info.get("active_queues", [])}
    try:
        names.update(keys.chat_queue(m) for m in _models_seen(handler.application.broker_uri_with_password))
    except redis.RedisError as exc:
        log.warning("cannot read the models seen: %s", exc)
    return sorted(names)


async def queue_depths(broker: Any, names: list[str]) -> list[dict[str, Any]]:
    """Flower's Redis broker `queues`, with a row per priority after each queue's total."""
    try:
        async with broker.redis.pipeline() as pipe:
            for name in names:
                for priority in broker.priority_steps:
                    pipe.llen(broker.broker_prefix + broker._q_for_pri(name, priority))
            lengths = iter(await pipe.execute())
        rows: list[dict[str, Any]] = []
        for name in names:
            by_priority = {priority: int(next(lengths)) for priority in broker.priority_steps}
            rows.append({"name": name, "messages": sum(by_priority.values())})
            rows.extend(
                {"name": priority_row_name(name, priority), "messages": n} for priority, n in by_priority.items()
            )
        return rows
    finally:
        await broker.redis.aclose()


BaseHandler.get_active_queue_names = queue_names
flower_broker.RedisBase.queues = queue_depths
