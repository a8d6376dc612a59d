"""Every Redis key, channel and Celery queue name the service uses, in one place."""

from __future__ import annotations

from kombu import Exchange, Queue

PREFIX = "llmq:"


def text(value: object) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


# Sorted set: worker id -> time of its last heartbeat.
WORKERS = PREFIX + "workers"
# Hash: model -> time any worker serving it last beat.
MODELS_SEEN = PREFIX + "models-seen"
# Lock held by whichever process is reaping lapsed leases and sweeping the queue.
REAPER_LOCK = PREFIX + "reaper-lock"
# Sorted set: job id -> time its lease lapses (the jobs in progress).
LEASES = PREFIX + "leases"
# Sorted set: job id -> when the sweeper next looks at it (the jobs queued).
QUEUED = PREFIX + "queued"
# Pub/sub channel on which the end of every batch line is announced (data: batch key).
BATCH_PROGRESS = PREFIX + "batch-progress"
# Pub/sub channel on which cancellations are announced to every worker.
CANCEL_CHANNEL = PREFIX + "cancel"


def job(job_id: str) -> str:
    """Hash: the job record (status, request, usage, ...)."""
    return f"{PREFIX}job:{job_id}"


def waiting(model: str) -> str:
    """Sorted set: the interactive jobs (not a batch's lines) of `model` that are queued,
    by the time they entered the queue. Its size is what admission control limits."""
    return f"{PREFIX}waiting:{model}"


def active(owner: str) -> str:
    """Set: the interactive jobs of an API key (its id) that are queued or running."""
    return f"{PREFIX}active:{owner}"


STARTS_BUCKET_SECONDS = 5


def started(model: str, when: float) -> str:
    """Counter with a TTL: the jobs of `model` started in the time bucket holding `when`
    (the queue's drain rate, from which a refused client is told when to retry)."""
    return f"{PREFIX}started:{model}:{int(when // STARTS_BUCKET_SECONDS)}"


def requests_window(owner: str, minute: int) -> str:
    """Counter with a TTL: an API key's chat requests in one minute."""
    return f"{PREFIX}rpm:{owner}:{minute}"


def owned_files(owner: str) -> str:
    """Sorted set: an API key's file ids by creation time."""
    return f"{PREFIX}files:owner:{owner}"


def owned_batches(owner: str) -> str:
    """Sorted set: an API key's batch ids by creation time."""
    return f"{PREFIX}batches:owner:{owner}"


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying one job's chunk events."""
    return f"{PREFIX}chunks:{job_id}"


def job_timing(job_id: str) -> str:
    """Hash: stage -> wall-clock time, a job's stamps for the benchmark (common.timing)."""
    return f"{PREFIX}timing:{job_id}"


def job_log(job_id: str) -> str:
    """List: the job's chunk events, index == seq (the replay log)."""
    return f"{PREFIX}events:{job_id}"


def worker(worker_id: str) -> str:
    """String (JSON WorkerInfo) with a TTL, refreshed by the worker's heartbeat."""
    return f"{PREFIX}worker:{worker_id}"


def model_card(model: str) -> str:
    """String (JSON ModelCard) describing a served model."""
    return f"{PREFIX}model:{model}"


def tokenizer_bundle(digest: str) -> str:
    """Hash: file name -> content of a model's tokenizer files, keyed by their digest."""
    return f"{PREFIX}tokenizer:{digest}"


def file(file_id: str) -> str:
    """Hash: an uploaded or generated file's metadata (its bytes live on disk)."""
    return f"{PREFIX}file:{file_id}"


# Sorted sets: file ids and batch ids by creation time.
FILES = PREFIX + "files"
BATCHES = PREFIX + "batches"
# Set: the batches that have not ended yet.
ACTIVE_BATCHES = PREFIX + "batches:active"


def batch(batch_id: str) -> str:
    """Hash: a batch's record (status, timestamps, counts, file ids, ...)."""
    return f"{PREFIX}batch:{batch_id}"


def batch_ended(batch_id: str, status: str) -> str:
    """Set: the job ids of a batch's lines that ended with `status` (completed, failed,
    cancelled). Sets, not counters: writing an end twice counts it once."""
    return f"{batch(batch_id)}:{status}"


# Set: the names of the `batch_slots` sets (a batch's slot reservation lists its set here),
# which the API's slot pruning walks.
BATCH_SLOT_SETS = PREFIX + "batch-slot-sets"


def batch_slots(model: str) -> str:
    """Set: the batch lines of `model` handed out and not ended (the slots batches hold)."""
    return f"{PREFIX}batch-slots:{model}"


def batch_lock(batch_id: str) -> str:
    """String with a TTL: held by the API process driving the batch."""
    return f"{PREFIX}batch-lock:{batch_id}"


def batch_job_id(batch_id: str, line: int) -> str:
    """The job id of a batch's input line (deterministic: re-dispatching is idempotent)."""
    return f"chatcmpl-{batch_id.removeprefix('batch_')}-{line}"


def chat_queue(model: str) -> str:
    """Celery queue consumed by the workers that serve `model`."""
    return f"chat.{model}"


def chat_queue_entity(model: str) -> Queue:
    """The model's queue as Celery sends to it and workers consume it: on the nameless
    exchange, so a message goes straight to the queue's list and needs no binding in
    the broker (bindings are lost when a Redis without persistence restarts)."""
    name = chat_queue(model)
    return Queue(name, Exchange(""), routing_key=name)


CHAT_TASK = "chat.completion"
# One message for several jobs (a batch's lines: api.batches.runner); args: [[job id, ...]].
CHAT_GROUP_TASK = "chat.group"
# Broker priorities (Redis: lower is served first): interactive chat before batch lines.
CHAT_PRIORITY = 0
BATCH_PRIORITY = 9


def broker_transport_options(visibility_timeout: int) -> dict[str, object]:
    """Celery's Redis transport options; producers and workers must agree on them."""
    return {
        "visibility_timeout": visibility_timeout,
        # Look for such messages every 10 s (kombu's default scans every 100 s).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "queue_order_strategy": "priority",
        "priority_steps": [CHAT_PRIORITY, BATCH_PRIORITY],
    }
