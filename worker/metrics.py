"""A worker's Prometheus metrics, served from its main process on a port of its own.

The registry is prometheus_client's default one, which holds the worker's own metrics
below, `common.metrics` (jobs ended by the terminal writes this worker makes) and its
engine's `vllm:*` metrics (vLLM's PrometheusStatLogger records them in the process that
holds the AsyncLLM: this one; see worker/vllm_engine.py). `serve` starts the HTTP
server; its URL goes into the worker's registration (`WorkerInfo.metrics_url`), where
the API's service discovery (`GET /metrics/targets`) finds it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlparse

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from common.settings import Settings

log = logging.getLogger(__name__)

# outcome: how a job this worker claimed left it. completed, failed, cancelled: the
# worker wrote that end; released: given back to the queue (an error before the end,
# the engine died); lost: another attempt or the reaper had it by then (its lease
# lapsed, Redis lost its log) or its record was gone.
JOBS = Counter("llmq_worker_jobs", "Jobs this worker claimed and ran, by how they left it", ["model", "outcome"])
OUTCOMES = ("completed", "failed", "cancelled", "released", "lost")
# One pipelined round trip of the chunk publisher (fenced appends and last events of
# every job with events waiting, sent together).
PUBLISH_SECONDS = Histogram(
    "llmq_worker_publish_seconds",
    "One pipelined Redis round trip of the chunk publisher",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
JOBS_IN_FLIGHT = Gauge("llmq_worker_jobs_in_flight", "Jobs this worker holds now", ["model"])
SLOTS = Gauge("llmq_worker_slots", "Jobs this worker can hold at once (WORKER_SLOTS)", ["model"])


def advertised_host(settings: Settings) -> str:
    """The host other machines reach this worker's metrics at (see `Settings`)."""
    if settings.worker_metrics_advertise_host:
        return settings.worker_metrics_advertise_host
    bind = settings.worker_metrics_host
    if bind not in ("", "0.0.0.0", "::"):
        return bind
    # The local address of the route to Redis: a UDP "connection" sends nothing.
    redis_host = urlparse(settings.redis_url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((redis_host, urlparse(settings.redis_url).port or 6379))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def url_of(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name
    return f"http://{host}:{port}/metrics"


def serve(settings: Settings) -> str | None:
    """Serve the default registry (a daemon thread) and answer its URL; None (logged) if
    the port cannot be had: the worker still serves jobs."""
    SLOTS.labels(settings.model_name).set(settings.worker_slots)
    for outcome in OUTCOMES:  # every series exists from the start (rates need a 0)
        JOBS.labels(settings.model_name, outcome)
    try:
        server, _ = start_http_server(settings.worker_metrics_port, settings.worker_metrics_host)
    except OSError as exc:
        log.error(
            "cannot serve metrics on %s:%d (%s); this worker runs without them",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
            exc,
        )
        return None
    url = url_of(advertised_host(settings), int(server.server_port))
    log.info("metrics at %s", url)
    return url
