"""Per-job stage stamps for the benchmark (`BENCH_TIMING=1`; off by default).

With it on, the API and the worker note wall-clock times (`time.time()`: every process
runs on one machine) as a streaming job passes each stage on its way to its first token
(`STAMPS`, in order; `STAGES` between them), keep them in memory, and write them once the job is done with, to
one Redis hash per job (`keys.job_timing`), which `bench/bench_stream.py` reads after a
run. The hooks in the hot path are `if timing.ENABLED:` guards: with it off they cost a
global lookup. Each stage keeps its first stamp, so a hook in a loop marks the first pass.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from common import keys

ENABLED = os.environ.get("BENCH_TIMING", "").strip().lower() in ("1", "true", "yes", "on")
# How long a job's stamps stay in Redis.
TTL_SECONDS = 3600

# The stamps a streaming chat job gets, in the order it passes them (`sent` and `client`
# are the benchmark client's own: it sent the request; its first content chunk arrived).
STAMPS = (
    "sent", "arrived", "submit", "admitted", "prepared", "recorded", "subscribed", "queued",
    "received", "task", "loop", "claimed", "engine_in", "engine_first", "publish", "published",
    "relayed", "sse", "client",
)  # fmt: skip
# The stages between them: (name, from stamp, to stamp, what is timed). They add up from
# `sent` to `client`, but for those in brackets, which overlap others (a task can start
# before `apply_async` returns; a pub/sub message reaches the API while the worker still
# waits for its pipeline's answer).
STAGES: tuple[tuple[str, str, str, str], ...] = (
    ("request", "sent", "arrived", "client: connection and request to the API's ASGI app"),
    ("http+validate", "arrived", "submit", "api: ASGI middlewares, body parse and validation, the key"),
    ("admission", "submit", "admitted", "api: the key's request count and a look at the queue (Redis)"),
    ("template+tokenize", "admitted", "prepared", "api: model card, chat template, tokenizer (thread)"),
    ("record write", "prepared", "recorded", "api: admission script storing the record, job.created log"),
    ("subscribe", "recorded", "subscribed", "api: the rest of the channel's subscription (made during the write)"),
    ("celery hop", "subscribed", "received", "Celery message sent, through Redis to the worker's consumer"),
    ("hand-off", "received", "loop", "worker: consumer to the engine loop (the job starts as its message arrives)"),
    ("claim", "loop", "claimed", "worker: the claim script (lease)"),
    ("record read", "claimed", "engine_in", "worker: the record read, attempt planned"),
    ("engine", "engine_in", "engine_first", "worker: the engine's first output (prefill, first step)"),
    ("publish wait", "engine_first", "publish", "worker: to the publisher's pipeline being sent"),
    ("relay", "publish", "relayed", "Redis pub/sub to the API's relay"),
    ("sse", "relayed", "sse", "api: reader, chunk rendering, SSE write"),
    ("client", "sse", "client", "socket to the client's first content chunk"),
    ("(celery send)", "subscribed", "queued", "api: the message's send until it returns (overlaps the hop)"),
    ("(publish RTT)", "publish", "published", "worker: the publish pipeline's round trip (overlaps relay)"),
    ("(slot thread)", "received", "task", "worker: the task reaching a slot thread, to wait for the job (overlaps)"),
)

_stamps: dict[str, dict[str, float]] = {}
_CHANNEL_PREFIX = len(keys.job_channel(""))
# Stamps of jobs never flushed (a client that left, a batch line) are dropped past this.
_MAX_JOBS = 10_000


def stamp(job_id: str, stage: str, when: float | None = None) -> None:
    """Note `stage` for a job now (or at `when`), unless it was noted already."""
    if len(_stamps) > _MAX_JOBS and job_id not in _stamps:
        _stamps.clear()
    _stamps.setdefault(job_id, {}).setdefault(stage, time.time() if when is None else when)


def stamps(job_id: str, **when: float) -> None:
    """Note several stages at the times given (each unless noted already)."""
    mine = _stamps.setdefault(job_id, {})
    for stage, at in when.items():
        mine.setdefault(stage, at)


def stamp_all(job_ids: list[str], stage: str) -> None:
    """Note `stage` now for each of `job_ids`."""
    now = time.time()
    for job_id in job_ids:
        _stamps.setdefault(job_id, {}).setdefault(stage, now)


def job_of_channel(channel: str) -> str:
    """The job whose chunk channel (`keys.job_channel`) this is."""
    return channel[_CHANNEL_PREFIX:]


def epoch_of(perf: float) -> float:
    """A `time.perf_counter()` reading as wall-clock time."""
    return time.time() - (time.perf_counter() - perf)


def take(job_id: str) -> dict[str, float]:
    """A job's stamps, forgotten here."""
    return _stamps.pop(job_id, {})


def flush(redis: Any, job_id: str) -> None:
    """Write a job's stamps to its timing hash (and forget them here), in the background:
    awaited, the write put a Redis round trip before a benchmarked stream's end (and its
    client's next request)."""
    stamps = take(job_id)
    if not stamps:
        return
    task = asyncio.get_running_loop().create_task(_write(redis, job_id, stamps))
    _writing.add(task)
    task.add_done_callback(_writing.discard)


# The writes under way (a task nothing refers to may be collected before it ends).
_writing: set[asyncio.Task[None]] = set()


async def _write(redis: Any, job_id: str, stamps: dict[str, float]) -> None:
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.job_timing(job_id), mapping=stamps)
            pipe.expire(keys.job_timing(job_id), TTL_SECONDS)
            await pipe.execute()
    except Exception:  # noqa: BLE001 - a benchmark's side note never fails a job
        pass


def stage_durations(stamps: dict[str, float]) -> dict[str, float]:
    """Seconds spent in each stage whose two stamps are there."""
    return {name: stamps[b] - stamps[a] for name, a, b, _ in STAGES if a in stamps and b in stamps}
