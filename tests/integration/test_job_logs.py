"""Logs that follow a job (issue 9): on real API and worker processes (fake engine) with
LOG_FORMAT=json, every job's lines across api.log and worker1.log tell its story in
order (created -> started -> ended) with its model, key id and token counts; the key and
the prompt never appear in any log, unless LOG_PROMPTS=true puts the prompt in
`job.created`."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from api.auth import key_id

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-logs-test-5f1e0a77c2"
WRONG_KEY = "sk-logs-wrong-0d9b3e41aa"
PROMPT = "Describe the violet heron of Quillmere in detail"
PROMPT2 = "Recite the amber ledger of Ostwick"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("job-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            # 8 tokens every 50 ms: a long job is still running when it is cancelled.
            "FAKE_STEP_SECONDS": "0.05",
            "WORKER_SLOTS": "4",
            "HEARTBEAT_SECONDS": "0.5",
            "FILES_DIR": str(logs / "files"),
            "API_KEYS": KEY,
            "LOG_FORMAT": "json",
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def records(path: Path) -> list[dict]:
    """The JSON log lines of a file (Celery's start-up banner is not a log line)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # a line that starts like JSON must be JSON
    return out


def events(s: Stack, *names: str) -> list[dict]:
    assert s.log_dir is not None
    lines = [r for name in names for r in records(s.log_dir / f"{name}.log")]
    return sorted((r for r in lines if "event" in r), key=lambda r: r["ts"])


def wait(predicate, timeout: float = 60, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def job_ended_in_logs(s: Stack, job_id: str, *names: str) -> bool:
    return any(r["event"] == "job.ended" and r.get("job_id") == job_id for r in events(s, *names))


def stream_job(url: str, key: str, prompt: str) -> tuple[str, dict, str]:
    """A streamed request: (job id, the usage the client got, the text it got)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict = {}
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=bearer(key), timeout=60) as resp:
        assert resp.status_code == 200
        job_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]
            text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return job_id, usage, "".join(text)


def wait_status(url: str, job_id: str, statuses: tuple[str, ...]) -> dict:
    def look():
        job = httpx.get(f"{url}/v1/chat/completions/{job_id}", headers=bearer(KEY), timeout=10).json()
        return job if job["status"] in statuses else None

    return wait(look)


def test_each_jobs_lines_tell_its_story_without_the_key_or_the_prompt(stack):
    url = stack.api_url
    me = key_id(KEY)

    # A streamed job, a background job, a cancelled one and a refused request.
    streamed, streamed_usage, streamed_text = stream_job(url, KEY, PROMPT)
    assert streamed_usage["completion_tokens"] == 24 and streamed_text

    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "background": True}
    background = httpx.post(url + "/v1/chat/completions", json=body, headers=bearer(KEY), timeout=30).json()["id"]
    background_usage = wait_status(url, background, ("completed",))["usage"]

    body = {**body, "max_tokens": 8 * 900}  # 900 steps of 50 ms: cancelled long before its end
    cancelled = httpx.post(url + "/v1/chat/completions", json=body, headers=bearer(KEY), timeout=30).json()["id"]
    wait_status(url, cancelled, ("in_progress",))
    resp = httpx.post(f"{url}/v1/chat/completions/{cancelled}/cancel", headers=bearer(KEY), timeout=30)
    assert resp.status_code == 200
    cancelled_job = wait_status(url, cancelled, ("cancelled",))
    cancelled_usage = cancelled_job["usage"]
    # Cancelled mid-run (0 tokens if the cancel beat the first engine step).
    assert 0 <= cancelled_usage["completion_tokens"] < 8 * 900

    refused = httpx.post(url + "/v1/chat/completions", json=body, headers=bearer(WRONG_KEY), timeout=30)
    assert refused.status_code == 401

    for job_id in (streamed, background, cancelled):
        wait(lambda job_id=job_id: job_ended_in_logs(stack, job_id, "worker1"))
    wait(lambda: [r for r in events(stack, "api") if r["event"] == "request" and r["status"] == 401])

    lines = events(stack, "api", "worker1")
    usages = {streamed: streamed_usage, background: background_usage, cancelled: cancelled_usage}
    for job_id, usage in usages.items():
        story = [r for r in lines if r.get("job_id") == job_id]
        for r in story:
            assert r.get("model", MODEL) == MODEL and r.get("key_id") == me, r
        state = [r for r in story if r["event"] in ("job.created", "job.started", "job.ended")]
        assert [(r["event"], r["process"]) for r in state] == [
            ("job.created", "api"),
            ("job.started", "worker"),
            ("job.ended", "worker"),
        ], story
        created, started, ended = state
        assert created["prompt_tokens"] == usage["prompt_tokens"] and "messages" not in created
        assert started["attempt"] == ended["attempt"] == 1 and started["queue_wait_s"] >= 0
        assert ended["prompt_tokens"] == usage["prompt_tokens"]
        assert ended["completion_tokens"] == usage["completion_tokens"]
        assert ended["duration_s"] >= 0 and "completion" not in ended
        # The HTTP request that made it, with its key id and status.
        posts = [r for r in story if r["event"] == "request" and r["method"] == "POST"]
        assert posts[0]["route"] == "/v1/chat/completions" and posts[0]["status"] == 200
    assert [r["status"] for r in lines if r.get("job_id") == streamed and r["event"] == "job.ended"] == ["completed"]
    assert [r["status"] for r in lines if r.get("job_id") == background and r["event"] == "job.ended"] == ["completed"]
    cancel_story = [r for r in lines if r.get("job_id") == cancelled]
    ended = next(r for r in cancel_story if r["event"] == "job.ended")
    assert ended["status"] == "cancelled"
    (asked,) = [r for r in cancel_story if r["event"] == "job.cancel_requested"]
    assert asked["status"] == "in_progress" and asked["by"] == "client" and asked["process"] == "api"
    worker_story = [r["event"] for r in cancel_story if r["process"] == "worker"]
    assert worker_story == ["job.started", "job.aborting", "job.ended"]
    cancel_route = "/v1/chat/completions/{completion_id}/cancel"
    assert [r["status"] for r in cancel_story if r["event"] == "request" and r["route"] == cancel_route] == [200]

    # The 401: one request line, no key id, no job.
    (unauthorized,) = [r for r in lines if r["event"] == "request" and r["status"] == 401]
    assert unauthorized["route"] == "/v1/chat/completions" and unauthorized["method"] == "POST"
    assert "key_id" not in unauthorized and "job_id" not in unauthorized

    # Neither key, nor the prompt, nor the answer's text is written anywhere.
    assert stack.log_dir is not None
    for path in stack.log_dir.glob("*.log"):
        text = path.read_text(errors="replace")
        for secret in (KEY, WRONG_KEY, PROMPT, streamed_text):
            assert secret not in text, f"{secret!r} in {path.name}"


def test_log_prompts_puts_the_prompt_in_job_created(stack):
    stack.env["LOG_PROMPTS"] = "true"
    try:
        stack.start_api("api2")
    finally:
        del stack.env["LOG_PROMPTS"]
    stack.wait_ready(MODEL, timeout=120, api="api2")
    job_id, usage, _ = stream_job(stack.url_of("api2"), KEY, PROMPT2)
    wait(lambda: job_ended_in_logs(stack, job_id, "worker1"))

    (created,) = [r for r in events(stack, "api2") if r["event"] == "job.created" and r["job_id"] == job_id]
    assert created["messages"] == [{"role": "user", "content": PROMPT2}]
    assert created["prompt_tokens"] == usage["prompt_tokens"] and created["key_id"] == key_id(KEY)
    assert stack.log_dir is not None
    # Only there: not in the first API's log, nor in the worker's (which has no LOG_PROMPTS).
    assert PROMPT2 not in (stack.log_dir / "api.log").read_text(errors="replace")
    assert PROMPT2 not in (stack.log_dir / "worker1.log").read_text(errors="replace")


def test_a_batchs_lines_name_their_batch_from_created_to_ended(stack):
    client = openai.OpenAI(base_url=stack.api_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    good = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
    lines = [
        {"custom_id": "good", "method": "POST", "url": "/v1/chat/completions", "body": good},
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {**good, "n": 0}},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    wait(lambda: client.batches.retrieve(batch.id).status == "completed")
    wait(lambda: [r for r in events(stack, "api") if r["event"] == "batch.ended" and r["batch_id"] == batch.id])

    me = key_id(KEY)
    lines_logged = events(stack, "api", "worker1")
    mine = [r for r in lines_logged if r.get("batch_id") == batch.id]
    assert [r["event"] for r in mine if r["event"].startswith("batch.")] == ["batch.created", "batch.ended"]
    assert all(r["key_id"] == me for r in mine)
    ended = next(r for r in mine if r["event"] == "batch.ended")
    assert (ended["status"], ended["completed"], ended["failed"]) == ("completed", 1, 1)
    good_job, bad_job = (f"chatcmpl-{batch.id.removeprefix('batch_')}-{i}" for i in (0, 1))
    assert [(r["event"], r["process"]) for r in mine if r.get("job_id") == good_job] == [
        ("job.created", "api"),
        ("job.started", "worker"),
        ("job.ended", "worker"),
    ]
    (bad,) = [r for r in mine if r.get("job_id") == bad_job]
    # An invalid line ends before it is queued: one line, naming what was wrong with it.
    assert (bad["event"], bad["status"], bad["status_code"], bad["param"], bad["by"]) == (
        "job.ended",
        "failed",
        400,
        "n",
        "batch",
    )


def test_the_api_and_the_worker_freeze_their_startup_heap(stack):
    """Each process moves its start-up objects out of the garbage collector's sight once
    up (common/heap.py): the API after its app and again after importing transformers
    (some 400,000 objects in all on the real stack), the worker after its engine. A full
    collection then walks only what was made since, instead of stalling every stream."""

    def frozen(process: str, log: str, n: int) -> list[int] | None:
        found = [r["objects"] for r in events(stack, log) if r["event"] == "heap.frozen" and r["process"] == process]
        return found if len(found) >= n else None

    # The API's second freeze comes after transformers is imported (the tokenizer warm-up).
    api = wait(lambda: frozen("api", "api", 2), timeout=30)
    worker = wait(lambda: frozen("worker", "worker1", 1), timeout=30)
    assert api[-1] > api[0] > 10_000, api
    assert api[-1] > 100_000, api  # transformers' modules among them
    assert worker[0] > 10_000, worker
