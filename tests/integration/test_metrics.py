"""The API's metrics (`GET /metrics`, `GET /metrics/targets`, api/metrics.py) on a real
stack with the fake engine: real requests move the counters and histograms by exactly
their amounts (a scrape before, a scrape after, parsed with prometheus_client's parser),
the queue gauges rise while the worker is stopped and fall when it returns, and the
workers' metrics endpoints are listed for Prometheus's service discovery."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from common import keys
from common.jobs import WorkerInfo

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
ALICE, BOB, ADMIN = "sk-alice-metrics-1", "sk-bob-metrics-2", "sk-admin-metrics-3"
QUEUE_LIMIT = 5
PER_KEY = 3
WORKER_TTL = 10
HI = [{"role": "user", "content": "hi"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """Two slots, 0.05 s an engine step (8 tokens), a short queue and per-key limit, and
    short leases and worker TTL so a stopped worker shows within seconds."""
    logs = tmp_path_factory.mktemp("metrics-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.05",
            "WORKER_SLOTS": "2",
            "HEARTBEAT_SECONDS": "0.5",
            "WORKER_TTL_SECONDS": str(WORKER_TTL),
            "LEASE_SECONDS": "3",
            "REAPER_INTERVAL_SECONDS": "0.5",
            "MAX_QUEUED_JOBS": str(QUEUE_LIMIT),
            "MAX_CONCURRENT_JOBS_PER_KEY": str(PER_KEY),
            "FILES_DIR": str(logs / "files"),
            "API_KEYS": f"{ALICE},{BOB}",
            "ADMIN_API_KEYS": ADMIN,
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        # Two API processes: a scrape, whichever answers it, sums both (api.serve, api.metrics).
        s.start_api(processes=2)
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def http(s: Stack, key: str | None = ALICE, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=s.api_url, timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})


def scrape(s: Stack) -> Samples:
    """Every sample of `GET /metrics`, asked for without a key (it is public)."""
    resp = httpx.get(s.api_url + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def deltas(before: Samples, after: Samples, name: str, skip: Callable[[dict[str, str]], bool] = lambda _: False):
    """The samples of `name` that moved, by their labels."""
    out = {}
    for key in set(before) | set(after):
        if key[0] != name or skip(dict(key[1])):
            continue
        moved = after.get(key, 0.0) - before.get(key, 0.0)
        if moved:
            out[tuple(sorted(key[1]))] = moved
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def wait(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} not met in {timeout} s")


def sse_events(resp: httpx.Response) -> Iterator[dict[str, Any] | str]:
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def has_content(event: dict[str, Any] | str) -> bool:
    return isinstance(event, dict) and any((c.get("delta") or {}).get("content") for c in event.get("choices", []))


def settled(s: Stack) -> bool:
    r = redis_lib.Redis.from_url(s.redis_url)
    return r.zcard(keys.waiting(MODEL)) == 0 and r.zcard(keys.LEASES) == 0 and r.zcard(keys.QUEUED) == 0


def chat(stream: bool = False, **body: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "stream": stream, **body}


def test_requests_and_jobs_move_the_counters_by_exactly_their_amounts(stack: Stack) -> None:
    wait(lambda: settled(stack), what="an idle stack")
    before = scrape(stack)
    polls = 0

    def status(c: httpx.Client, job_id: str) -> str:
        nonlocal polls
        polls += 1
        resp = c.get(f"/v1/chat/completions/{job_id}")
        assert resp.status_code == 200
        return str(resp.json()["status"])

    with http(stack) as c:
        # A stream, to its end: TTFT once, ITL once per content chunk after the first. Long
        # enough (2.5 s) to be still open when the scrape (to either API process) arrives.
        with c.stream("POST", "/v1/chat/completions", json=chat(True, max_tokens=400)) as resp:
            assert resp.status_code == 200
            streamed = []
            for event in sse_events(resp):
                if not streamed:
                    open_now = value(scrape(stack), "llmq_open_streams")  # while it is sent
                streamed.append(event)
        assert streamed[-1] == "[DONE]"
        content_chunks = sum(1 for e in streamed if has_content(e))
        assert content_chunks >= 2
        streamed_id = next(e["id"] for e in streamed if isinstance(e, dict))
        # Not streamed: e2e, no TTFT.
        assert c.post("/v1/chat/completions", json=chat(max_tokens=16)).status_code == 200
        # Refused: no key (401), invalid (400), unknown job (404).
        with http(stack, key=None) as anonymous:
            assert anonymous.post("/v1/chat/completions", json=chat()).status_code == 401
        assert c.post("/v1/chat/completions", json=chat(n=99)).status_code == 400
        assert c.get("/v1/chat/completions/chatcmpl-no-such-job").status_code == 404
        # The stream again (GET .../stream): a resume, which times nothing.
        with c.stream("GET", f"/v1/chat/completions/{streamed_id}/stream") as resp:
            assert resp.status_code == 200
            assert sum(1 for e in sse_events(resp) if has_content(e)) == content_chunks
        # A long non-streamed request whose client leaves: cancelled (disconnect), a 499.
        with pytest.raises(httpx.ReadTimeout), http(stack, timeout=1.5) as impatient:
            impatient.post("/v1/chat/completions", json=chat(max_tokens=4000))
        left = redis_lib.Redis.from_url(stack.redis_url).zrange(keys.LEASES, 0, -1)
        assert len(left) == 1
        wait(lambda: status(c, keys.text(left[0])) == "cancelled", what="the left job cancelled")
        # A background job, cancelled while running (client); cancelling it again counts nothing.
        job = c.post("/v1/chat/completions", json=chat(max_tokens=4000, background=True)).json()
        wait(lambda: status(c, job["id"]) == "in_progress", what="the background job running")
        cancel = f"/v1/chat/completions/{job['id']}/cancel"
        assert c.post(cancel).json()["status"] == "cancelled"
        assert c.post(cancel).json()["status"] == "cancelled"

    wait(lambda: settled(stack), what="every job ended")
    after = wait(
        lambda: (
            (a := scrape(stack))
            and value(a, "llmq_queue_wait_seconds_count", model=MODEL)
            - value(before, "llmq_queue_wait_seconds_count", model=MODEL)
            >= 3
            and a
        ),
        what="the queue waits observed",
    )

    not_scrapes = lambda lbl: lbl.get("route") == "/metrics"  # noqa: E731
    chat_route, job_route = "/v1/chat/completions", "/v1/chat/completions/{completion_id}"
    assert deltas(before, after, "llmq_http_requests_total", not_scrapes) == {
        labels(route=chat_route, method="POST", status="200"): 3,
        labels(route=chat_route, method="POST", status="499"): 1,
        labels(route=chat_route, method="POST", status="401"): 1,
        labels(route=chat_route, method="POST", status="400"): 1,
        labels(route=job_route, method="GET", status="200"): polls,
        labels(route=job_route, method="GET", status="404"): 1,
        labels(route=job_route + "/stream", method="GET", status="200"): 1,
        labels(route=job_route + "/cancel", method="POST", status="200"): 2,
    }
    assert deltas(before, after, "llmq_http_request_duration_seconds_count", not_scrapes) == {
        labels(route=chat_route, method="POST"): 6,
        labels(route=job_route, method="GET"): polls + 1,
        labels(route=job_route + "/stream", method="GET"): 1,
        labels(route=job_route + "/cancel", method="POST"): 2,
    }
    assert deltas(before, after, "llmq_rejections_total") == {
        labels(reason="auth"): 1,
        labels(reason="validation"): 1,
        labels(reason="not_found"): 1,
    }
    m = labels(model=MODEL)
    assert deltas(before, after, "llmq_time_to_first_token_seconds_count") == {m: 1}
    assert deltas(before, after, "llmq_inter_token_latency_seconds_count") == {m: content_chunks - 1}
    assert deltas(before, after, "llmq_e2e_request_latency_seconds_count") == {m: 2}  # the stream, the plain one
    assert deltas(before, after, "llmq_queue_wait_seconds_count") == {m: 3}  # the same two and the left one
    assert deltas(before, after, "llmq_stream_resumes_total") == {m: 1}
    assert deltas(before, after, "llmq_cancellations_total") == {
        labels(model=MODEL, source="disconnect"): 1,
        labels(model=MODEL, source="client"): 1,
    }
    # Running jobs cancelled end in their worker: nothing ended by this API process.
    assert deltas(before, after, "llmq_jobs_ended_total") == {}
    assert open_now == 1 and value(after, "llmq_open_streams") == 0
    # The histograms' sums are real durations: TTFT within the stream's whole time.
    ttft = value(after, "llmq_time_to_first_token_seconds_sum", model=MODEL) - value(
        before, "llmq_time_to_first_token_seconds_sum", model=MODEL
    )
    e2e = value(after, "llmq_e2e_request_latency_seconds_sum", model=MODEL) - value(
        before, "llmq_e2e_request_latency_seconds_sum", model=MODEL
    )
    assert 0 < ttft < e2e


def queue(samples: Samples) -> dict[str, float]:
    g = {
        "interactive": value(samples, "llmq_queue_waiting_jobs", model=MODEL, priority="interactive"),
        "batch": value(samples, "llmq_queue_waiting_jobs", model=MODEL, priority="batch"),
        "in_flight": value(samples, "llmq_batch_lines_in_flight", model=MODEL),
        "pending": value(samples, "llmq_batch_lines_pending", model=""),
        "live": value(samples, "llmq_workers_live", model=MODEL),
        "capacity": value(samples, "llmq_slots_capacity", model=MODEL),
        "in_use": value(samples, "llmq_slots_in_use", model=MODEL),
    }
    return g


def test_queue_gauges_rise_while_the_worker_is_stopped_and_fall_when_it_returns(stack: Stack) -> None:
    wait(lambda: settled(stack), what="an idle stack")
    idle = {"interactive": 0, "batch": 0, "in_flight": 0, "pending": 0, "live": 1, "capacity": 2, "in_use": 0}
    wait(lambda: queue(scrape(stack)) == idle, what="idle gauges (the heartbeat's inflight lags a beat)")
    before = scrape(stack)
    worker = stack.proc("worker1").popen.pid
    r = redis_lib.Redis.from_url(stack.redis_url)
    with http(stack) as alice, http(stack, BOB) as bob, concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Two long jobs (5 s of engine steps) running when the worker stops: one is cancelled
        # (twice, counted once) and ended by the reaper; the other's lease lapses, the reaper
        # requeues it.
        long_job, cancelled_job = (
            alice.post("/v1/chat/completions", json=chat(max_tokens=800, background=True)).json()["id"]
            for _ in range(2)
        )
        both = (long_job, cancelled_job)
        wait(lambda: all(r.hget(keys.job(j), "status") == b"in_progress" for j in both), what="the long jobs running")
        wait(lambda: queue(scrape(stack))["in_use"] == 2, what="the worker's heartbeat showing its jobs")
        os.kill(worker, signal.SIGSTOP)
        try:
            cancel = f"/v1/chat/completions/{cancelled_job}/cancel"
            first_cancel = pool.submit(alice.post, cancel)  # flags it, waits (<= 3 s) for its end
            wait(lambda: r.hget(keys.job(cancelled_job), "cancel_requested") == b"1", what="the cancel flagged")
            assert alice.post(cancel).status_code == 200  # while it is still flagged, in progress
            assert first_cancel.result().status_code == 200
            # A batch of 3 lines: one slot's worth handed out (queued), two pending.
            client = openai.OpenAI(base_url=stack.api_url + "/v1", api_key=ALICE, max_retries=0)
            lines = "".join(
                json.dumps(
                    {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat(max_tokens=8)}
                )
                + "\n"
                for i in range(3)
            )
            upload = client.files.create(file=("lines.jsonl", lines.encode()), purpose="batch")
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            wait(
                lambda: (g := queue(scrape(stack)))["batch"] == 1 and g["in_flight"] == 1 and g["pending"] == 2,
                timeout=WORKER_TTL - 2,
                what="one batch line queued, two pending",
            )
            # Bob: three jobs waiting, the fourth refused by his per-key limit (429 rate_limit).
            for _ in range(PER_KEY):
                assert bob.post("/v1/chat/completions", json=chat(max_tokens=16, background=True)).status_code == 200
            assert bob.post("/v1/chat/completions", json=chat(background=True)).status_code == 429
            wait(lambda: queue(scrape(stack))["interactive"] == PER_KEY + 1, what="the long job requeued")
            # Alice's stream waits in the queue; she leaves: cancelled while queued, by this API.
            with alice.stream("POST", "/v1/chat/completions", json=chat(True, max_tokens=16)) as resp:
                events = sse_events(resp)  # (kept: a generator dropped would close the response)
                first = next(events)
                assert isinstance(first, dict) and not has_content(first), first
                assert queue(scrape(stack))["interactive"] == QUEUE_LIMIT
            wait(lambda: queue(scrape(stack))["interactive"] == PER_KEY + 1, what="the left stream's job ended")
            # The queue full: a 429 overloaded; a queued job cancelled by its client.
            queued = alice.post("/v1/chat/completions", json=chat(background=True)).json()["id"]
            assert alice.post("/v1/chat/completions", json=chat(background=True)).status_code == 429
            assert alice.post(f"/v1/chat/completions/{queued}/cancel").json()["status"] == "cancelled"
            # The worker counts as gone once its registration is stale.
            peak = wait(lambda: (g := queue(scrape(stack)))["live"] == 0 and g, what="the worker gone")
            oldest = value(scrape(stack), "llmq_queue_oldest_wait_seconds", model=MODEL)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert peak == {
            "interactive": PER_KEY + 1,
            "batch": 1,
            "in_flight": 1,
            "pending": 2,
            "live": 0,
            "capacity": 0,
            "in_use": 0,
        }
        assert 1 < oldest < 60
        # Back: everything runs and the gauges fall to where they were.
        wait(lambda: queue(scrape(stack)) == idle, what="the queue drained")
        wait(lambda: client.batches.retrieve(batch.id).status == "completed", what="the batch completed")
        assert value(scrape(stack), "llmq_queue_oldest_wait_seconds", model=MODEL) == 0
    wait(lambda: settled(stack), what="every job ended")
    after = scrape(stack)
    assert deltas(before, after, "llmq_rejections_total") == {
        labels(reason="rate_limit"): 1,
        labels(reason="overloaded"): 1,
    }
    # Ended by this API process: the left stream's job and the one cancelled, both queued,
    # and by its reaper (the worker was stopped) the running job cancelled.
    assert deltas(before, after, "llmq_jobs_ended_total") == {labels(model=MODEL, status="cancelled", code=""): 3}
    assert deltas(before, after, "llmq_cancellations_total") == {
        labels(model=MODEL, source="disconnect"): 1,
        labels(model=MODEL, source="client"): 2,
    }
    assert deltas(before, after, "llmq_reaper_actions_total") == {
        labels(model=MODEL, action="requeued"): 1,
        labels(model=MODEL, action="cancelled"): 1,
    }
    # The stream never got a token: no TTFT, and no queue wait for a job that never started.
    assert deltas(before, after, "llmq_time_to_first_token_seconds_count") == {}
    assert deltas(before, after, "llmq_queue_wait_seconds_count") == {}


def test_metrics_targets_list_the_live_workers_metrics_endpoints(stack: Stack) -> None:
    r = redis_lib.Redis.from_url(stack.redis_url)
    resp = httpx.get(stack.api_url + "/metrics/targets", timeout=10)  # public, like /metrics
    assert resp.status_code == 200
    groups = resp.json()
    (worker_id,) = [keys.text(w) for w in r.zrange(keys.WORKERS, 0, -1)]
    info = WorkerInfo.model_validate_json(r.get(keys.worker(worker_id)))
    assert info.metrics_url, "the worker announces no metrics URL"
    assert groups == [
        {
            "targets": [info.metrics_url.split("/")[2]],
            "labels": {"__metrics_path__": "/metrics", "model": MODEL, "worker": worker_id},
        }
    ]
    # A target answers with the worker's own metrics.
    assert httpx.get(f"http://{groups[0]['targets'][0]}/metrics", timeout=10).status_code == 200

    # Another worker registering (here by hand): listed, and counted in the queue gauges.
    extra = WorkerInfo(
        id="extra@test",
        model="metrics-extra",
        slots=5,
        started=time.time(),
        inflight=3,
        metrics_url="http://127.0.0.1:9/metrics",
    )
    r.set(keys.worker(extra.id), extra.model_dump_json(), ex=60)
    r.zadd(keys.WORKERS, {extra.id: time.time() + 3600})
    r.hset(keys.MODELS_SEEN, extra.model, time.time())
    try:
        groups = httpx.get(stack.api_url + "/metrics/targets", timeout=10).json()
        assert {
            "targets": ["127.0.0.1:9"],
            "labels": {"__metrics_path__": "/metrics", "model": "metrics-extra", "worker": "extra@test"},
        } in groups
        assert len(groups) == 2
        samples = scrape(stack)
        assert value(samples, "llmq_workers_live", model="metrics-extra") == 1
        assert value(samples, "llmq_slots_capacity", model="metrics-extra") == 5
        assert value(samples, "llmq_slots_in_use", model="metrics-extra") == 3
    finally:
        r.zrem(keys.WORKERS, extra.id)
        r.delete(keys.worker(extra.id))
    assert len(httpx.get(stack.api_url + "/metrics/targets", timeout=10).json()) == 1
    assert ("llmq_workers_live", frozenset({("model", "metrics-extra")})) not in scrape(stack)
