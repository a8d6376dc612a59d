"""What operators and the queue see: Flower task events, job records, cancellation on
client disconnect."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_jobs_show_in_flower_without_prompts(client, model, stack):
    secret = "zebra-umbrella-4711"
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": secret}], max_tokens=4)
    url = f"http://127.0.0.1:{stack.flower_port}/api/tasks"
    deadline = time.monotonic() + 30
    task = None
    while time.monotonic() < deadline and task is None:
        try:
            tasks = httpx.get(url, timeout=5).json()
            task = tasks.get(r.id)
        except (httpx.HTTPError, ValueError):
            pass
        if task is None or task.get("state") != "SUCCESS":
            task = None
            time.sleep(0.5)
    assert task is not None, "job never showed as succeeded in Flower"
    assert task["name"] == "chat.completion"
    assert r.id in task["args"] and secret not in str(task)


def test_job_record_tracks_the_job(client, model, redis):
    r = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=4)
    rec = {k.decode(): v.decode() for k, v in redis.hgetall(f"llmq:job:{r.id}").items()}
    assert rec["status"] == "completed" and rec["model"] == model and rec["attempt"] == "1"
    assert float(rec["created"]) <= float(rec["started"]) <= float(rec["finished"])
    assert rec["worker"].startswith("worker1@")
    assert 0 < redis.ttl(f"llmq:job:{r.id}") <= 24 * 3600


def test_client_disconnect_aborts_the_generation(client, model, redis):
    stream = client.chat.completions.create(
        model=model, messages=FRANCE, max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    job_id = None
    for i, chunk in enumerate(stream):
        job_id = chunk.id
        if i >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        status = redis.hget(f"llmq:job:{job_id}", "status").decode()
        if status == "cancelled":
            break
        time.sleep(0.2)
    assert status == "cancelled"
    usage = redis.hget(f"llmq:job:{job_id}", "usage")
    assert usage is not None and b'"completion_tokens"' in usage
