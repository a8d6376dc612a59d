"""A batch's lines go out several to a Celery message (`chat.group`, issue 12), on real
Redis, a real Celery worker and the API with the fake engine: every line runs once, and a
worker holding a group takes that many fewer other messages, so its engine never holds
more jobs than its slots."""

from __future__ import annotations

import collections
import io
import json
import sys
import time

import httpx
import openai
import pytest
import redis as redis_lib

from worker.fake_engine import expected_text

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
SLOTS = 32  # a 0.75 batch share: 24 batch slots, 6 lines a message
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gstack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("group-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.05",
            "WORKER_SLOTS": str(SLOTS),
            "BATCH_SLOT_SHARE": "0.75",
            "FILES_DIR": str(logs / "files"),
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


def statuses(s: Stack) -> dict[str, str]:
    r = redis_lib.Redis.from_url(s.redis_url)
    ids = [k.decode()[len("llmq:job:") :] for k in r.scan_iter("llmq:job:*", count=1000)]
    with r.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(f"llmq:job:{job_id}", "status")
        values = pipe.execute()
    return {j: v.decode() for j, v in zip(ids, values, strict=True) if v is not None}


def batch_lines(n: int, max_tokens: int) -> bytes:
    body = {"model": MODEL, "messages": HI, "max_tokens": max_tokens, "ignore_eos": True}
    return "".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
        for i in range(n)
    ).encode()


def test_a_worker_holding_groups_takes_no_more_jobs_than_its_slots(gstack):
    """24 lines go out as 4 messages of 6 and run together; 16 interactive jobs arrive
    while they run: the worker takes 8 of them (32 slots), the other 8 wait in the queue
    until lines end. Without counting a group's jobs against the prefetch, it took all 16
    (40 jobs in an engine of 32 slots: seen failing)."""
    client = openai.OpenAI(base_url=gstack.api_url + "/v1", api_key="unused", max_retries=0)
    tokens = 8 * 60  # 60 fake steps of 0.05 s: about 3 s
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(batch_lines(24, tokens))), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while sum(v == "in_progress" for v in statuses(gstack).values()) < 24:
        assert time.monotonic() < deadline, statuses(gstack)
        time.sleep(0.05)
    jobs = []
    for _ in range(16):
        body = {"model": MODEL, "messages": HI, "max_tokens": tokens, "background": True}
        resp = httpx.post(gstack.api_url + "/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        jobs.append(resp.json()["id"])
    # While all the lines run: how many interactive jobs ran beside them (at most), and
    # the messages the worker holds unacknowledged (kombu's `unacked` hash): 4 groups of 6
    # lines and a message for each interactive job it took.
    most, beside, held = 0, 0, collections.Counter()
    r = redis_lib.Redis.from_url(gstack.redis_url)
    while True:
        now = statuses(gstack)
        running = [j for j, v in now.items() if v == "in_progress"]
        most = max(most, len(running))
        if sum(1 for j in running if j not in jobs) < 24:
            break
        beside = max(beside, sum(1 for j in running if j in jobs))
        unacked = [json.loads(raw)[0] for raw in r.hvals("unacked")]
        held = max(held, collections.Counter(m["headers"]["task"] for m in unacked), key=lambda c: c.total())
        time.sleep(0.05)
    assert most <= SLOTS, most
    assert beside == 8, (beside, most)
    assert held == {"chat.group": 4, "chat.completion": 8}, held
    # Then everything ends: each line once, with its whole answer.
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline and b.status in ("validating", "in_progress", "finalizing"), b
        time.sleep(0.2)
    assert b.request_counts is not None and b.request_counts.completed == 24
    assert b.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"l{i}" for i in range(24))
    prompt = out[0]["response"]["body"]["usage"]["prompt_tokens"]
    assert {o["response"]["body"]["choices"][0]["message"]["content"] for o in out} == {expected_text(prompt, tokens)}
    for job_id in jobs:
        deadline = time.monotonic() + 60
        while statuses(gstack).get(job_id) != "completed":
            assert time.monotonic() < deadline, job_id
            time.sleep(0.1)
