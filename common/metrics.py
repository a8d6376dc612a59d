"""Prometheus metrics shared by the API and the workers (each process has its own
registry: the default one; see `api/metrics.py` and `worker/metrics.py` for how each
serves it). A job's end is counted by the process that writes it: a worker finishing
or failing it, an API cancelling a queued job, the reaper (in any process) ending or
requeueing one. `sum(...)` across every scraped process gives the service's totals."""

from __future__ import annotations

from prometheus_client import Counter

# Jobs ended, by the process that wrote the end. status: completed, failed, cancelled;
# code: the error code of a failed job ("" otherwise).
JOBS_ENDED = Counter(
    "llmq_jobs_ended_total",
    "Jobs that reached a terminal status, counted where the terminal write was made",
    ["model", "status", "code"],
)
# The reaper taking back a job whose lease lapsed (requeued) or ending it, and the
# sweeper re-sending or failing a queued job.
REAPER_ACTIONS = Counter(
    "llmq_reaper_actions_total",
    "What the reaper and the sweeper did: requeued, failed, cancelled (lapsed leases); resent, expired (queued jobs)",
    ["model", "action"],
)
