"""Worker metrics and Flower's Broker page (issue 9, requirement 3).

On the real engine (the session stack): the worker announces where its Prometheus
metrics are in its registration, and after real requests its engine's `vllm:*` counters
and histograms and its own `llmq_worker_*` ones moved by exactly what the API reported.
With the fake engine (a stack of its own, Flower started before the worker, as in
production): Flower's Broker page, as a browser gets it, lists the model's queue with
the real number of waiting interactive jobs and batch lines while the worker is stopped.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from html.parser import HTMLParser
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

STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is two plus two?",
]

Scrape = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Scrape:
    """Every sample of a Prometheus text page, by sample name (e.g. `x_total`, `x_count`)."""
    text = httpx.get(url, timeout=10).text
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples


def value(samples: Scrape, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
    return sum(v for have, v in samples.get(name, []) if all(have.get(k) == x for k, x in labels.items()))


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for(check: Callable[[], Any], timeout: float = 60, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(step)


def registrations(r: redis_lib.Redis, model: str) -> list[WorkerInfo]:
    infos = []
    for worker_id in r.zrange(keys.WORKERS, 0, -1):
        raw = r.get(keys.worker(keys.text(worker_id)))
        if raw:
            info = WorkerInfo.model_validate_json(raw)
            if info.model == model:
                infos.append(info)
    return infos


# -- the real engine --------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_url(stack, redis, model) -> str:
    """The session worker's, from its registration (the newest, if an earlier test restarted it)."""
    info = max(registrations(redis, model), key=lambda i: i.started)
    assert info.metrics_url and info.metrics_url.startswith("http://127.0.0.1:"), info
    return info.metrics_url


def idle(url: str, model: str) -> Scrape | None:
    samples = scrape(url)
    return samples if value(samples, "llmq_worker_jobs_in_flight", model=model) == 0 else None


def test_worker_metrics_move_by_what_the_api_reported(client, model, metrics_url):
    before = wait_for(lambda: idle(metrics_url, model), timeout=120)
    assert before is not None, "the worker never became idle"
    assert value(before, "llmq_worker_slots", model=model) == 64
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in before, name

    usages = []
    for question in QUESTIONS:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12
        )
        assert r.usage is not None and r.usage.completion_tokens > 0
        usages.append(r.usage)
    n = len(QUESTIONS)

    def settled() -> Scrape | None:
        # The worker counts a job once its end is written, just after the API may have answered.
        now = idle(metrics_url, model)
        done = value(before, "llmq_worker_jobs_total", model=model, outcome="completed") + n
        return now if now and value(now, "llmq_worker_jobs_total", model=model, outcome="completed") >= done else None

    after = wait_for(settled, timeout=30)
    assert after is not None, "the worker never counted the jobs"

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    engine = {"model_name": model}
    # vLLM's own counters: the tokens the engine prefilled and generated are those the API
    # reported (each job's prompt goes to the engine as it is; no stop strings cut tokens).
    assert moved("vllm:prompt_tokens_total", **engine) == sum(u.prompt_tokens for u in usages)
    assert moved("vllm:generation_tokens_total", **engine) == sum(u.completion_tokens for u in usages)
    assert moved("vllm:time_to_first_token_seconds_count", **engine) == n
    assert moved("vllm:request_success_total", **engine) == n
    assert moved("vllm:e2e_request_latency_seconds_count", **engine) == n
    # The worker's own.
    assert moved("llmq_worker_jobs_total", model=model, outcome="completed") == n
    for outcome in ("failed", "cancelled", "released", "lost"):
        assert moved("llmq_worker_jobs_total", model=model, outcome=outcome) == 0, outcome
    assert moved("llmq_jobs_ended_total", model=model, status="completed", code="") == n
    # At least one pipelined round trip per job (its last event), each under a second here.
    assert moved("llmq_worker_publish_seconds_count", model=model) >= n
    assert moved("llmq_worker_publish_seconds_bucket", model=model, le="1.0") == moved(
        "llmq_worker_publish_seconds_count", model=model
    )


def test_gauges_show_a_running_job_and_a_cancel_is_counted(client, http, model, metrics_url, redis):
    before = wait_for(lambda: idle(metrics_url, model), timeout=120)
    assert before is not None, "the worker never became idle"
    job = client.chat.completions.create(
        model=model, messages=STORY, max_tokens=4000, extra_body={"background": True, "ignore_eos": True}
    )
    try:

        def running() -> Scrape | None:
            samples = scrape(metrics_url)
            busy = value(samples, "llmq_worker_jobs_in_flight", model=model) == 1
            return samples if busy and value(samples, "vllm:num_requests_running", model_name=model) == 1 else None

        during = wait_for(running, timeout=60)
        assert during is not None, "the running job never showed in the gauges"
        assert value(during, "vllm:kv_cache_usage_perc", model_name=model) > 0
        # The registration says so too (its heartbeat refreshes it).
        assert wait_for(lambda: [i for i in registrations(redis, model) if i.inflight == 1], timeout=30)
    finally:
        assert http.post(f"/v1/chat/completions/{job.id}/cancel").status_code == 200
    after = wait_for(lambda: idle(metrics_url, model), timeout=60)
    assert after is not None, "the cancelled job never left the worker"
    assert delta(before, after, "llmq_worker_jobs_total", model=model, outcome="cancelled") == 1
    assert delta(before, after, "llmq_jobs_ended_total", model=model, status="cancelled") == 1


# -- Flower's Broker page ---------------------------------------------------------------

FAKE_MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-broker-test-0123456789"
FLOWER_AUTH = ("operator", "broker-page-secret")


class QueueTable(HTMLParser):
    """The rows of the Broker page's queue table, each a list of its cells' text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_table = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", "queue-table") in attrs:
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def broker_page(s: Stack) -> dict[str, str]:
    """Flower's Broker page as a browser gets it: queue name -> its Messages cell."""
    resp = httpx.get(
        f"http://127.0.0.1:{s.flower_port}/broker", auth=FLOWER_AUTH, headers={"Accept": "text/html"}, timeout=10
    )
    resp.raise_for_status()
    table = QueueTable()
    table.feed(resp.text)
    return {row[0]: row[1] for row in table.rows if len(row) >= 2}


def blocked_in_brpop(r: redis_lib.Redis) -> bool:
    """Whether some connection (a worker's consumer) is blocked in BRPOP on the queues."""
    return any(c.get("cmd") == "brpop" and "b" in c.get("flags", "") for c in r.client_list())


def flower_answers(s: Stack) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{s.flower_port}/healthcheck", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory):
    """The fake engine, and Flower started before the worker (as when a vLLM worker builds
    its engine for a minute): Flower's one inspection at start finds no worker. The worker
    stays live for two minutes after it stops beating, so a stopped worker still counts
    (batch lines are handed out only to live capacity), and queued jobs are not sent again
    meanwhile (each message would count twice)."""
    logs = tmp_path_factory.mktemp("flower-broker-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=free_port(),
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "WORKER_SLOTS": "8",
            "WORKER_TTL_SECONDS": "120",
            "QUEUE_RESEND_SECONDS": "600",
            "API_KEYS": KEY,
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "FILES_DIR": str(logs / "files"),
        },
    )
    try:
        s.start_redis()
        s.start_flower()
        assert wait_for(lambda: flower_answers(s), timeout=60), "Flower never answered"
        s.start_worker()
        s.start_api()
        s.wait_ready(FAKE_MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def test_flower_broker_page_lists_each_model_queue_by_priority_with_its_depth(flower_stack):
    s = flower_stack
    queue = keys.chat_queue(FAKE_MODEL)
    interactive = f"{queue} · interactive (priority {keys.CHAT_PRIORITY})"
    batch = f"{queue} · batch (priority {keys.BATCH_PRIORITY})"
    r = redis_lib.Redis.from_url(s.redis_url)
    batch_list = f"{queue}\x06\x16{keys.BATCH_PRIORITY}"
    client = openai.OpenAI(base_url=s.api_url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    assert broker_page(s) == {queue: "0", interactive: "0", batch: "0"}

    # b batch lines go out two to a message (a worker of 8 slots: 6 batch slots, a quarter
    # of them rounded up): the broker holds (and Flower lists) messages, not lines.
    k, b, b_messages = 7, 3, 2
    worker = s.proc("worker1").popen.pid
    os.kill(worker, signal.SIGSTOP)
    try:
        # A BRPOP the worker had pending would still take a message; it times out within 1 s.
        assert wait_for(lambda: not blocked_in_brpop(r), timeout=10), "the stopped worker still waits on its queue"
        jobs = [
            client.chat.completions.create(
                model=FAKE_MODEL, messages=STORY, max_tokens=8, extra_body={"background": True}
            ).id
            for _ in range(k)
        ]
        lines = "".join(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": FAKE_MODEL, "messages": STORY, "max_tokens": 8},
                }
            )
            + "\n"
            for i in range(b)
        )
        file_id = client.files.create(file=("in.jsonl", io.BytesIO(lines.encode())), purpose="batch").id
        batch_id = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        # The state: every message in the broker's lists (the batch runner hands lines out
        # in the background).
        assert wait_for(lambda: r.llen(queue) == k and r.llen(batch_list) == b_messages, timeout=60), (
            r.llen(queue),
            r.llen(batch_list),
        )
        assert broker_page(s) == {queue: str(k + b_messages), interactive: str(k), batch: str(b_messages)}
    finally:
        os.kill(worker, signal.SIGCONT)

    # Back at work: every job ends and the page follows the queue down to 0.
    def ended() -> bool:
        done = all(client.chat.completions.retrieve(j).model_extra["status"] == "completed" for j in jobs)
        return done and client.batches.retrieve(batch_id).status == "completed"

    assert wait_for(ended, timeout=60), "the jobs never ended"
    assert broker_page(s) == {queue: "0", interactive: "0", batch: "0"}
    # Flower's own metrics are still there, and saw the jobs' task events.
    text = httpx.get(f"http://127.0.0.1:{s.flower_port}/metrics", auth=FLOWER_AUTH, timeout=10).text
    events = {
        (sample.labels.get("type"), sample.labels.get("task")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "flower_events_total"
    }
    # A task a message: the jobs and the lone line as chat.completion, the pair as chat.group.
    assert events.get(("task-succeeded", keys.CHAT_TASK), 0) >= k + 1
    assert events.get(("task-succeeded", keys.CHAT_GROUP_TASK), 0) >= 1
