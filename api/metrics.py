"""The API's Prometheus metrics, served at `GET /metrics` (text format 0.0.4), and the
workers' scrape targets at `GET /metrics/targets` (Prometheus HTTP service discovery).

Three kinds. Run by `python -m api.serve` (`make run`, the tests, the image), the API is
API_PROCESSES processes on one port, any of which may answer a scrape: each process
writes its samples to files in PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode, the directory made empty by `api.serve`) and `/metrics` reports
their sum over every process, live or ended (counters and histograms), and over the
live ones for the open-streams gauge. Without that variable (the app run some other
way) a process reports its own registry. Several API hosts are still scraped one by one.

- **Requests** (`MetricsMiddleware`, one pure ASGI middleware just inside CORS, so the
  auth middleware's 401s and the size limits' 413/431 count too): requests by route
  template (never the raw path: `other` when no route matches), method and status (499:
  the client left before an answer started), their duration (to the last byte sent: an
  SSE stream's whole life), rejections by reason, SSE streams open.
- **Jobs as the client sees them** (`RequestTimer`, `observe_queue_wait`, the counters
  below; fed by `api.endpoints.chat`, `api.routes.chat` and `api.jobs.pipeline`): time to
  first content chunk, the gaps between content chunks and end to end, from the
  request's arrival; queue wait (created -> started, from the record); resumed streams;
  cancellations; jobs this process ended (`common.metrics.JOBS_ENDED`).
- **The queue** (`queue_snapshot`, `QueueCollector`): computed from Redis at each scrape
  with two pipelined round trips (no scan of job records). Every API process exports the
  same queue gauges: aggregate them with `max by (model)` (or `max by (model, priority)`),
  never `sum`.

- `llmq_queue_waiting_jobs{model,priority}`: jobs queued and not started; `interactive`:
  chat (the model's waiting set), `batch`: batch lines handed out (holding a batch slot)
  and still queued.
- `llmq_queue_oldest_wait_seconds{model}`: age of the oldest interactive job waiting (0: none).
- `llmq_batch_lines_pending{model=""}`: lines of running batches not handed out yet. A
  line's model is known only once it is handed out (a batch may mix models), so this is
  one series with `model=""`.
- `llmq_batch_lines_in_flight{model}`: batch lines handed out and not ended (queued or
  running): the batch slots held.
- `llmq_workers_live{model}`, `llmq_slots_capacity{model}`, `llmq_slots_in_use{model}`: the
  live workers, the sum of their slots and of the jobs they hold (their heartbeat's
  `inflight`).

The models listed are those of live workers, plus any (ever seen by a worker) with jobs
waiting or batch lines in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import keys
from common.jobs import WorkerInfo
from common.workers import live_workers

# Set (by `api.serve`) to the directory every API process writes its samples to.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The paths served here, public unless METRICS_REQUIRE_KEY (see api.auth, api.main).
METRICS_PATHS = frozenset({"/metrics", "/metrics/targets"})
# Where the middleware notes a request's arrival (time.perf_counter()) in the ASGI scope.
ARRIVED = "llmq.arrived"

# Seconds: 10 ms to 10 min (time to first token, end to end, queue wait).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Seconds: 1 ms to 10 s (between chunks).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Seconds: 5 ms to 5 min (HTTP requests; a stream lasts as long as its job).
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

HTTP_REQUESTS = Counter(
    "llmq_http_requests_total",
    "HTTP requests answered, by route template (`other`: no route), method and status",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "llmq_http_request_duration_seconds",
    "From a request's arrival to the last byte of its response (an SSE stream: its whole life)",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
)
REJECTIONS = Counter(
    "llmq_rejections_total",
    "Requests refused: auth (401), rate_limit (429, a key's limits), overloaded (429, the model's queue is "
    "full), validation (400), too_large (413, 431), not_found (404)",
    ["reason"],
)
OPEN_STREAMS = Gauge(
    "llmq_open_streams",
    "SSE streams the API is sending now (summed over its live processes)",
    multiprocess_mode="livesum",
)
TTFT = Histogram(
    "llmq_time_to_first_token_seconds",
    "Streams: from the request's arrival to its first content chunk sent",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
ITL = Histogram(
    "llmq_inter_token_latency_seconds",
    "Streams: time between two content chunks sent (a chunk carries one or more tokens)",
    ["model"],
    buckets=ITL_BUCKETS,
)
E2E = Histogram(
    "llmq_e2e_request_latency_seconds",
    "From a chat request's arrival to its end sent ([DONE], or the whole completion), streamed or not",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "llmq_queue_wait_seconds",
    "A job's time from created to started (its latest start), once per job an API request follows",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
STREAM_RESUMES = Counter("llmq_stream_resumes_total", "Job streams read with GET .../stream", ["model"])
CANCELLATIONS = Counter(
    "llmq_cancellations_total",
    "Jobs cancelled while queued or running: client (POST cancel), disconnect (an ordinary request's client "
    "left), batch (a batch cancelled or expired)",
    ["model", "source"],
)

# -- requests ----------------------------------------------------------------------------

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Status -> rejection reason; a 429's reason depends on its error code.
REJECTED = {401: "auth", 400: "validation", 413: "too_large", 431: "too_large", 404: "not_found"}
# Bytes of a 429's body kept to read its error code (an OpenAI error object is ~300).
MAX_429_BODY = 4096


def route_label(scope: Scope) -> str:
    """The request's route template (`/v1/chat/completions/{completion_id}`), or `other`.
    The router notes the route it picked in the scope; a request answered before routing
    (a 401, a 413) is matched here against the app's routes."""
    route = scope.get("route")
    if route is None:
        app = scope.get("app")
        partial = None
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) and path else "other"


def rejection_reason(status: int, body: bytes = b"") -> str | None:
    if status == 429:
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        return "overloaded" if code == "engine_overloaded" else "rate_limit"
    return REJECTED.get(status)


class MetricsMiddleware:
    """Counts every HTTP request once it is answered (see the module's docstring)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[ARRIVED] = start
        status = 500  # until a response starts (an exception before it is a 500, the client leaving a 499)
        started = streaming = False
        body_429 = b""

        async def counting_send(message: Message) -> None:
            nonlocal status, started, streaming, body_429
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                for name, value in message.get("headers") or ():
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
                        OPEN_STREAMS.inc()
            elif message["type"] == "http.response.body" and status == 429 and len(body_429) < MAX_429_BODY:
                body_429 += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except asyncio.CancelledError:
            if not started:
                status = 499  # the client left before an answer was sent (a non-streamed chat request)
            raise
        finally:
            if streaming:
                OPEN_STREAMS.dec()
            route = route_label(scope)
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_DURATION.labels(route, method).observe(time.perf_counter() - start)
            reason = rejection_reason(status, body_429)
            if reason is not None:
                REJECTIONS.labels(reason).inc()


def arrived_at(scope: Scope) -> float:
    """When the request arrived (the middleware's note; now without the middleware)."""
    value = scope.get(ARRIVED)
    return value if isinstance(value, float) else time.perf_counter()


# -- jobs as the client sees them -------------------------------------------------------


class RequestTimer:
    """The latencies of one chat request that creates and follows its job, as its client
    sees them: call `content_sent` after each content chunk is sent, `ended` once the end
    is sent."""

    def __init__(self, model: str, arrived: float):
        self.model = model
        self.arrived = arrived
        self._last: float | None = None
        # The labelled children, looked up once: `content_sent` runs for every chunk.
        self._ttft = TTFT.labels(model)
        self._itl = ITL.labels(model)

    def content_sent(self, chunks: int = 1) -> None:
        """`chunks` content chunks went out in one write (a reader that fell behind, or
        the last ones with [DONE]): the first is timed from the previous write (or the
        request, for the first token), the others arrived with it (0 s apart)."""
        now = time.perf_counter()
        if self._last is None:
            self._ttft.observe(now - self.arrived)
        else:
            self._itl.observe(now - self._last)
        for _ in range(chunks - 1):
            self._itl.observe(0.0)
        self._last = now

    def ended(self) -> None:
        E2E.labels(self.model).observe(time.perf_counter() - self.arrived)


def observe_queue_wait(model: str, created: object, started: object) -> None:
    """A job's queue wait from its record's `created` and `started` (floats, or the raw
    Redis values); nothing when it never started."""
    try:
        wait = float(keys.text(started)) - float(keys.text(created))
    except (TypeError, ValueError):
        return
    QUEUE_WAIT.labels(model).observe(max(0.0, wait))


def count_cancellation(model: str, source: str) -> None:
    CANCELLATIONS.labels(model, source).inc()


def count_resume(model: str) -> None:
    STREAM_RESUMES.labels(model).inc()


# -- the queue ---------------------------------------------------------------------------

# KEYS: the model's batch slots, QUEUED. The lines holding a slot, and how many of them
# are still queued (in QUEUED). The set is bounded by the batch slots (a share of the
# live workers' slots), so this is cheap.
_BATCH_QUEUED = """
local ids = redis.call('SMEMBERS', KEYS[1])
local queued = 0
for _, id in ipairs(ids) do
  if redis.call('ZSCORE', KEYS[2], id) then queued = queued + 1 end
end
return {#ids, queued}
"""


@dataclass
class ModelQueue:
    waiting_interactive: int = 0
    waiting_batch: int = 0
    oldest_wait_seconds: float = 0.0
    batch_in_flight: int = 0
    workers_live: int = 0
    slots_capacity: int = 0
    slots_in_use: int = 0


@dataclass
class QueueSnapshot:
    models: dict[str, ModelQueue] = field(default_factory=dict)
    batch_lines_pending: int = 0


def build_snapshot(
    workers: Iterable[WorkerInfo],
    per_model: dict[str, tuple[int, float | None, int, int]],
    batches: Iterable[tuple[str | None, int, int]],
    now: float,
) -> QueueSnapshot:
    """The snapshot from what Redis answered: the live workers; per model seen, (jobs
    waiting, score of the oldest, batch lines holding a slot, of which queued); per
    active batch, (status, n_total, n_dispatched)."""
    snap = QueueSnapshot()
    for w in workers:
        m = snap.models.setdefault(w.model, ModelQueue())
        m.workers_live += 1
        m.slots_capacity += w.slots
        m.slots_in_use += w.inflight
    for model, (waiting, oldest, in_flight, batch_queued) in per_model.items():
        if model not in snap.models and not (waiting or in_flight):
            continue  # seen once, nothing live or waiting now
        m = snap.models.setdefault(model, ModelQueue())
        m.waiting_interactive = waiting
        m.oldest_wait_seconds = max(0.0, now - oldest) if waiting and oldest is not None else 0.0
        m.batch_in_flight = in_flight
        m.waiting_batch = batch_queued
    for status, total, dispatched in batches:
        if status == "in_progress":
            snap.batch_lines_pending += max(0, total - dispatched)
    return snap


async def queue_snapshot(redis: aioredis.Redis, worker_ttl_seconds: float) -> QueueSnapshot:
    """The queue now, from Redis in two pipelined round trips: who is live, which models
    and batches there are; then the workers' registrations and, per model and batch, a
    few O(1) or slot-bounded commands."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.WORKERS, time.time() - worker_ttl_seconds, "+inf")  # as common.workers does
        pipe.hkeys(keys.MODELS_SEEN)
        pipe.smembers(keys.ACTIVE_BATCHES)
        worker_ids, seen_raw, batch_ids_raw = await pipe.execute()
    models = sorted({keys.text(m) for m in seen_raw})
    batch_ids = sorted(keys.text(b) for b in batch_ids_raw)
    batch_queued = redis.register_script(_BATCH_QUEUED)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.mget([keys.worker(keys.text(i)) for i in worker_ids] or [keys.worker("")])
        for model in models:
            pipe.zcard(keys.waiting(model))
            pipe.zrange(keys.waiting(model), 0, 0, withscores=True)
            await batch_queued(keys=[keys.batch_slots(model), keys.QUEUED], client=pipe)
        for batch_id in batch_ids:
            pipe.hmget(keys.batch(batch_id), "status", "n_total", "n_dispatched")
        infos, *replies = await pipe.execute()
    now = time.time()
    workers = [WorkerInfo.model_validate_json(raw) for raw in infos if raw]
    per_model: dict[str, tuple[int, float | None, int, int]] = {}
    for i, model in enumerate(models):
        waiting, oldest, (in_flight, queued) = replies[3 * i : 3 * i + 3]
        per_model[model] = (int(waiting), float(oldest[0][1]) if oldest else None, int(in_flight), int(queued))
    batches = [
        (keys.text(status) if status is not None else None, int(total or 0), int(dispatched or 0))
        for status, total, dispatched in replies[3 * len(models) :]
    ]
    return build_snapshot(workers, per_model, batches, now)


class QueueCollector(Collector):
    """A snapshot's gauges (see the module's docstring; `max by (model)` across API processes)."""

    def __init__(self, snapshot: QueueSnapshot):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        models = self.snapshot.models
        waiting = GaugeMetricFamily(
            "llmq_queue_waiting_jobs",
            "Jobs queued and not started: interactive (chat), batch (lines handed out, still queued). "
            "Same in every API process: max by (model, priority)",
            labels=["model", "priority"],
        )
        oldest = GaugeMetricFamily(
            "llmq_queue_oldest_wait_seconds",
            "Age of the oldest interactive job waiting (0: none). max by (model)",
            labels=["model"],
        )
        in_flight = GaugeMetricFamily(
            "llmq_batch_lines_in_flight",
            "Batch lines handed out and not ended (queued or running): batch slots held. max by (model)",
            labels=["model"],
        )
        live = GaugeMetricFamily("llmq_workers_live", "Live workers. max by (model)", labels=["model"])
        capacity = GaugeMetricFamily(
            "llmq_slots_capacity", "Sum of the live workers' slots. max by (model)", labels=["model"]
        )
        in_use = GaugeMetricFamily(
            "llmq_slots_in_use", "Sum of the jobs the live workers hold. max by (model)", labels=["model"]
        )
        for name in sorted(models):
            m = models[name]
            waiting.add_metric([name, "interactive"], m.waiting_interactive)
            waiting.add_metric([name, "batch"], m.waiting_batch)
            oldest.add_metric([name], m.oldest_wait_seconds)
            in_flight.add_metric([name], m.batch_in_flight)
            live.add_metric([name], m.workers_live)
            capacity.add_metric([name], m.slots_capacity)
            in_use.add_metric([name], m.slots_in_use)
        pending = GaugeMetricFamily(
            "llmq_batch_lines_pending",
            'Lines of running batches not handed out yet (model="": a line\'s model is known once handed out). '
            "max by (model)",
            labels=["model"],
        )
        pending.add_metric([""], self.snapshot.batch_lines_pending)
        yield from (waiting, oldest, pending, in_flight, live, capacity, in_use)


def multiprocess_dir() -> str | None:
    """Where every API process writes its samples (None: each process on its own)."""
    return os.environ.get(MULTIPROC_ENV) or None


def forget_dead_processes(include_self: bool = False) -> list[int]:
    """Take the live gauges of API processes that are gone out of the sums (a process
    the supervisor replaced, killed before it could do this itself; with `include_self`,
    this one, at its shutdown); their counters stay. Returns the pids forgotten."""
    directory = multiprocess_dir()
    if directory is None:
        return []
    gone = []
    for path in Path(directory).glob("gauge_live*_*.db"):
        try:
            pid = int(path.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() and not include_self or pid != os.getpid() and _alive(pid):
            continue
        try:
            multiprocess.mark_process_dead(pid, directory)
        except OSError:
            # Another process forgetting the same one removed its file first (two
            # replacements starting at once): done. Bookkeeping must never fail a start
            # (uvicorn's supervisor stops the whole API when a process fails to start).
            continue
        gone.append(pid)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_metrics() -> bytes:
    """The API's own metrics: every process's, summed, in multiprocess mode; else this one's."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Declared(multiprocess.MultiProcessCollector(None, path=directory)))
    return generate_latest(registry)


class _Declared(Collector):
    """The samples every process wrote, plus the llmq families no process has touched yet
    (their HELP and TYPE, no sample), as a single process's registry shows them."""

    def __init__(self, collector: multiprocess.MultiProcessCollector):
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        seen = set()
        for family in self.collector.collect():
            seen.add(family.name)
            yield family
        for family in REGISTRY.collect():  # this process's own metrics: only their declarations
            if family.name.startswith("llmq_") and family.name not in seen:
                yield Metric(family.name, family.documentation, family.type, family.unit)


def render(snapshot: QueueSnapshot | None) -> bytes:
    """The API's metrics (see `process_metrics`), then the queue's (when Redis answered)."""
    out = process_metrics()
    if snapshot is not None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(QueueCollector(snapshot))
        out += generate_latest(registry)
    return out


# -- scrape targets ----------------------------------------------------------------------


def sd_targets(workers: Iterable[WorkerInfo]) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery: one target group per live worker serving its
    metrics (`metrics_url`); workers without one are left out."""
    groups: list[dict[str, Any]] = []
    for w in sorted(workers, key=lambda w: w.id):
        if not w.metrics_url:
            continue
        url = urlsplit(w.metrics_url)
        if not url.hostname:
            continue
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        port = url.port or (443 if url.scheme == "https" else 80)
        labels = {"__metrics_path__": url.path or "/metrics", "model": w.model, "worker": w.id}
        if url.scheme == "https":
            labels["__scheme__"] = "https"
        groups.append({"targets": [f"{host}:{port}"], "labels": labels})
    return groups


# -- routes ------------------------------------------------------------------------------

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format: the API's metrics (every process's) and the queue's (left out, and
    the rest still served, when Redis does not answer)."""
    settings = request.app.state.settings
    try:
        snapshot: QueueSnapshot | None = await queue_snapshot(request.app.state.redis, settings.worker_ttl_seconds)
    except (RedisError, OSError):
        snapshot = None
    return Response(render(snapshot), media_type=CONTENT_TYPE_PLAIN_0_0_4)


@router.get("/metrics/targets", include_in_schema=False)
async def metrics_targets(request: Request) -> JSONResponse:
    """The live workers' metrics endpoints, for Prometheus's `http_sd_configs`."""
    workers = await live_workers(request.app.state.redis, request.app.state.settings.worker_ttl_seconds)
    return JSONResponse(sd_targets(workers))
