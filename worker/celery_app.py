"""The Celery app of a model worker.

    celery -A worker.celery_app worker

Tasks run in threads, `worker_slots` of them: each holds one job, and all of them feed
the one engine that the `WorkerRuntime` builds when the worker process starts. The
worker consumes its model's queue only, one message per free slot (prefetch 1), and
acknowledges a message once its job has ended (late acks).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, signals

from common import keys, timing
from common.job_queue import JobQueue
from common.logs import setup_logging
from common.redis_client import broker_settings
from common.settings import get_settings
from worker import metrics as worker_metrics
from worker.prefetch import GroupPrefetch
from worker.runtime import WorkerRuntime, unique_worker_id

log = logging.getLogger(__name__)
settings = get_settings()


# The worker's threads (the Celery consumer, a slot thread per job, the engine's event loop,
# which takes vLLM's outputs and feeds it new requests) share the interpreter lock; a
# thread that wants it waits for the holder to let go, at most the switch interval,
# Python's 5 ms by default. Under a burst of jobs the engine loop waited behind the consumer
# and the slot threads: at 1 ms, two alternating A/B pairs of `bench_stream.py --only llmq
# --levels 8,32` gave 286 and 280 -> 296 and 307 tok/s at 32 streams and a first token 12
# to 61 ms sooner at the median at 8 (issue 12).
sys.setswitchinterval(settings.worker_switch_interval_ms / 1000)

# The tasks module imports this one; Celery imports it once the app exists (no cycle).
app = Celery("llmq-worker", include=["worker.tasks"])
app.conf.update(
    # llmq's transport (common/broker.py); TLS and Sentinel as configured.
    **broker_settings(
        settings.redis_url,
        keys.broker_transport_options(settings.broker_visibility_timeout),
        "common.broker:Transport",
    ),
    worker_pool="threads",
    worker_concurrency=settings.worker_slots,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    # JSON only, never pickle: whoever can write to the broker cannot make a worker run code.
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    task_queues=[keys.chat_queue_entity(settings.model_name)],
    task_default_queue=keys.chat_queue(settings.model_name),
    # Task events feed Flower.
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_runtime: WorkerRuntime | None = None
# A group message's jobs count against the prefetch (worker/prefetch.py).
group_prefetch = GroupPrefetch()
signals.task_received.connect(group_prefetch.received, weak=False)
signals.task_revoked.connect(group_prefetch.revoked, weak=False)


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started")
    return _runtime


def _setup_logs(**_: object) -> None:
    """Logs (issue 9): every line of the worker, Celery's own included, through one handler
    in LOG_FORMAT (text or JSON) at LOG_LEVEL (common/logs.py). Done first thing in
    `worker_init`; Celery's `setup_logging` signal, which fires after it, finds a receiver
    (this) and so leaves the root logger, the task logger and stdout/stderr alone (Celery's
    `--loglevel` is not used: LOG_LEVEL is)."""
    setup_logging(settings, "worker")


signals.setup_logging.connect(_setup_logs)


def _stamp_received(request: object = None, **_: object) -> None:
    """BENCH_TIMING: the consumer has the task's message (before a slot thread takes it)."""
    job_id = getattr(request, "id", None)
    if job_id:
        timing.stamp(job_id, "received")


if timing.ENABLED:
    signals.task_received.connect(_stamp_received, weak=False)


def _chat_job_id(request: Any) -> str | None:
    """The job id of a chat task's message (its one argument), else None."""
    if request is None or getattr(request, "name", None) != keys.CHAT_TASK:
        return None
    args = request.args
    job_id = args[0] if isinstance(args, list | tuple) and len(args) == 1 else None
    return job_id if isinstance(job_id, str) else None


def _start_early(request: Any = None, **_: object) -> None:
    """A chat job starts on the engine loop as its message arrives (in the consumer's
    thread), not once a slot thread has taken its task (`WorkerRuntime.start_early`)."""
    job_id = _chat_job_id(request)
    if job_id is not None and _runtime is not None and not request.eta:
        _runtime.start_early(job_id)


def _forget_early(request: Any = None, **_: object) -> None:
    job_id = _chat_job_id(request)
    if job_id is not None and _runtime is not None:
        _runtime.forget_early(job_id)


signals.task_received.connect(_start_early, weak=False)
signals.task_revoked.connect(_forget_early, weak=False)


@signals.worker_init.connect
def _start_runtime(sender: object = None, **_: object) -> None:
    """Build the engine once, in the worker's main process, before it takes any job."""
    global _runtime
    from worker.engine import build_engine

    _setup_logs()
    hostname = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    # Prometheus metrics on a port of this worker's own (issue 9; worker/metrics.py),
    # served from here on (vllm:* once the engine is built), announced in its registration.
    metrics_url = worker_metrics.serve(settings)
    try:
        requeue = JobQueue(settings.redis_url, settings.broker_visibility_timeout)
        _runtime = WorkerRuntime(
            settings,
            build_engine(settings),
            worker_id=unique_worker_id(hostname),
            requeue=requeue.submit,
            metrics_url=metrics_url,
        )
        _runtime.start()
    except Exception:
        # Celery only logs what a worker_init handler raises, then consumes the queue and
        # fails every job it takes. Exit instead, before taking any message, so that the
        # messages wait for a worker that can run them and the failure is seen.
        log.exception(
            "worker %s cannot start its engine (MODEL_PATH=%s, ENGINE=%s); exiting",
            hostname,
            settings.model_path,
            settings.engine,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)  # not SystemExit: leftover engine threads must not keep the process up
    log.info("worker %s serving %s", _runtime.worker_id, settings.model_name)


@signals.worker_shutdown.connect
def _stop_runtime(**_: object) -> None:
    if _runtime is not None:
        _runtime.stop()
