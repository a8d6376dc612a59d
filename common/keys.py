"""Every Redis key, channel and Celery queue name the service uses, in one place."""

from __future__ import annotations

PREFIX = "llmq:"

# Sorted set: worker id -> time of its last heartbeat.
WORKERS = PREFIX + "workers"
# Pub/sub channel on which cancellations are announced to every worker.
CANCEL_CHANNEL = PREFIX + "cancel"


def job(job_id: str) -> str:
    """Hash: the job record (status, request, usage, ...)."""
    return f"{PREFIX}job:{job_id}"


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying one job's chunk events."""
    return f"{PREFIX}chunks:{job_id}"


def worker(worker_id: str) -> str:
    """String (JSON WorkerInfo) with a TTL, refreshed by the worker's heartbeat."""
    return f"{PREFIX}worker:{worker_id}"


def model_card(model: str) -> str:
    """String (JSON ModelCard) describing a served model."""
    return f"{PREFIX}model:{model}"


def tokenizer_bundle(digest: str) -> str:
    """Hash: file name -> content of a model's tokenizer files, keyed by their digest."""
    return f"{PREFIX}tokenizer:{digest}"


def chat_queue(model: str) -> str:
    """Celery queue consumed by the workers that serve `model`."""
    return f"chat.{model}"


CHAT_TASK = "chat.completion"
