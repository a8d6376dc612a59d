"""What operators and the queue see: Flower task events (behind its login), job records,
cancellation on client disconnect; health and CORS for browser clients."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_jobs_show_in_flower_without_prompts(client, model, flower):
    secret = "zebra-umbrella-4711"
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": secret}], max_tokens=4)
    deadline = time.monotonic() + 30
    task = None
    while time.monotonic() < deadline and task is None:
        try:
            tasks = flower.get("/api/tasks").json()
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


def test_flower_requires_its_login(stack, flower_auth):
    base = f"http://127.0.0.1:{stack.flower_port}"
    for path in ("/", "/tasks", "/api/tasks", "/api/workers"):
        assert httpx.get(base + path, timeout=10).status_code == 401, path
        assert httpx.get(base + path, auth=(flower_auth[0], "wrong"), timeout=10).status_code == 401, path
    assert httpx.get(base + "/api/tasks", auth=flower_auth, timeout=10).status_code == 200
    assert httpx.get(base + "/", auth=flower_auth, timeout=10).status_code == 200


def test_v1_health_is_health(stack):
    for path in ("/health", "/v1/health"):
        resp = httpx.get(stack.api_url + path, timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "ok", path


def test_cors_preflight_needs_no_key_and_only_allowed_origins_pass(stack, cors_origin, http):
    preflight = {
        "Origin": cors_origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    # A preflight never carries the API key: it is answered before any key is checked.
    resp = httpx.options(stack.api_url + "/v1/chat/completions", headers=preflight, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == cors_origin
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        stack.api_url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}, timeout=10
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # The actual request: the page may read the answer and the headers clients need.
    resp = http.get("/v1/models", headers={"Origin": cors_origin})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == cors_origin
    exposed = resp.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed and "x-ratelimit-remaining-requests" in exposed
    resp = http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
