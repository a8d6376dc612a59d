"""The job core end to end, on real Redis, Celery workers and API processes with the fake
engine (what is tested here is the orchestration, not the model): every accepted job
ends, whatever happens to the processes around it."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time

import httpx
import pytest
import redis as redis_lib

from tests.integration.sse import read_sse

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    logs = tmp_path_factory.mktemp("job-core-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=None,
        log_dir=logs,
        env={
            "ENGINE": "fake",
            "FAKE_STEP_SECONDS": "0.02",
            # 2 x 64: the batch-share test counts on 96 batch slots.
            "WORKER_SLOTS": "64",
            "HEARTBEAT_SECONDS": "0.5",
            "WORKER_TTL_SECONDS": "3",
            "LEASE_SECONDS": "2",
            "REAPER_INTERVAL_SECONDS": "0.5",
            "QUEUE_RESEND_SECONDS": "3",
            "NO_WORKER_TIMEOUT_SECONDS": "3",
            "FILES_DIR": str(logs / "files"),
        },
    )
    try:
        s.start_redis()
        s.start_worker("twin")
        s.start_worker("twin")  # the same Celery node name: a copied command line
        s.start_api()
        s.start_api("api2", free_port())
        s.wait_ready(MODEL, timeout=120)
        s.wait_ready(MODEL, timeout=120, api="api2")
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


def record(s: Stack, job_id: str) -> dict[str, str]:
    raw = redis_lib.Redis.from_url(s.redis_url).hgetall(f"llmq:job:{job_id}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def wait(predicate, timeout: float = 60, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def background(s: Stack, max_tokens: int, model: str = MODEL) -> str:
    body = {"model": model, "messages": HI, "max_tokens": max_tokens, "background": True}
    resp = httpx.post(s.api_url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def test_two_workers_under_one_name_hold_their_jobs_apart(core):
    """Two worker processes share one Celery node name; the one running a job is killed.
    The other keeps beating under that name, yet the job's lease lapses and the job runs
    again (before: it stayed in_progress forever)."""
    job_id = background(core, max_tokens=8 * 150)  # about 3 s
    holder = wait(
        lambda: record(core, job_id).get("worker") if record(core, job_id).get("status") == "in_progress" else None
    )
    assert holder.startswith("twin@") and "/" in holder  # unique per process
    pid = int(holder.split("/")[1].split("-")[0])
    os.killpg(pid, signal.SIGKILL)
    for p in core.procs:
        if p.popen.pid == pid:
            p.expected_exit = True  # type: ignore[attr-defined]
            p.popen.wait(10)
    final = wait(lambda: record(core, job_id) if record(core, job_id)["status"] in ("completed", "failed") else None)
    assert final["status"] == "completed" and final["attempt"] == "2" and final["worker"] != holder
    core.start_worker("twin")


async def test_api_shutdown_ends_streams_without_cancelling_their_jobs(core):
    """SIGTERM of an API process (a rolling deploy) ends its streams, but their jobs go on
    and the client resumes on another process (before: every job was cancelled)."""
    url2 = core.url_of("api2")
    body = {"model": MODEL, "messages": HI, "max_tokens": 8 * 150, "stream": True}
    async with httpx.AsyncClient(timeout=60) as h:
        cut = asyncio.create_task(read_sse(h, "POST", url2 + "/v1/chat/completions", json_body=body))
        job_id = await asyncio.to_thread(
            wait,
            lambda: next(
                (
                    k.decode()[9:]
                    for k in redis_lib.Redis.from_url(core.redis_url).scan_iter("llmq:job:*")
                    if record(core, k.decode()[9:]).get("status") == "in_progress"
                ),
                None,
            ),
        )
        await asyncio.sleep(0.5)
        await asyncio.to_thread(core.stop_proc, core.proc("api2"))
        try:
            first = await asyncio.wait_for(cut, 30)
        except (httpx.HTTPError, httpx.StreamError):
            first = None
        final = await asyncio.to_thread(
            wait, lambda: record(core, job_id) if record(core, job_id)["status"] != "in_progress" else None
        )
        assert final["status"] == "completed"
        rest = await read_sse(
            h,
            "GET",
            core.api_url + f"/v1/chat/completions/{job_id}/stream",
            headers={"Last-Event-ID": first.last_id} if first and first.last_id else None,
        )
    result = json.loads(final["result"])["choices"][0]["text"]
    assert rest.done and (first.text if first and first.last_id else "") + rest.text == result
    core.start_api("api2", core.api_ports["api2"])


async def test_jobs_of_a_model_whose_workers_are_gone_end_with_a_clear_error(core):
    """The only worker of a model dies with one job running and one queued: both end with
    `model_unavailable`, and their readers get the error and [DONE] (before: they waited
    for the record to expire, 24 h)."""
    core.start_worker("lonely", {"MODEL_NAME": "lonely", "WORKER_SLOTS": "1"})
    core.wait_ready("lonely", timeout=60)
    running = background(core, max_tokens=8 * 500, model="lonely")
    waiting = background(core, max_tokens=8, model="lonely")
    wait(lambda: record(core, running).get("status") == "in_progress")
    core.kill("lonely")
    async with httpx.AsyncClient(timeout=120) as h:
        streams = await asyncio.gather(
            *(read_sse(h, "GET", core.api_url + f"/v1/chat/completions/{j}/stream") for j in (running, waiting))
        )
    for job_id, stream in zip((running, waiting), streams, strict=True):
        assert stream.done and stream.errors and stream.errors[-1]["code"] == "model_unavailable", stream.events[-3:]
        assert record(core, job_id)["status"] == "failed"


async def test_resume_cursors_out_of_range_or_past_the_end(core):
    async with httpx.AsyncClient(base_url=core.api_url, timeout=30) as h:
        body = {
            "model": MODEL,
            "messages": HI,
            "max_tokens": 40,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        whole = await read_sse(h, "POST", "/v1/chat/completions", json_body=body)
        job_id = whole.chunks[0]["id"]
        url = f"/v1/chat/completions/{job_id}/stream"
        for bad in ("-5", "-2", str(2**63), "9" * 30, "abc"):
            resp = await h.get(url, headers={"Last-Event-ID": bad})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "Last-Event-ID", bad
        resp = await h.get(url, params={"starting_after": -5})
        assert resp.status_code == 400
        # From the final usage chunk's id, or any id past the end: nothing more, then [DONE].
        for after in (whole.last_id, "10000"):
            rest = await asyncio.wait_for(read_sse(h, "GET", url, headers={"Last-Event-ID": after}), 10)
            assert rest.done and rest.chunks == [], after
        # From the start: everything again.
        again = await read_sse(h, "GET", url, headers={"Last-Event-ID": "-1"})
        assert again.text == whole.text and again.done


def test_two_batches_together_stay_within_the_batch_share(core):
    """Two batches run at once on workers with 2 x 64 slots: together their lines in
    flight never exceed the batch share (0.75: 96 slots), leaving the rest to chat."""
    import io

    import openai

    client = openai.OpenAI(base_url=core.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    line = {"model": MODEL, "messages": HI, "max_tokens": 8 * 20}
    ids = []
    for b in range(2):
        data = "".join(
            json.dumps({"custom_id": f"b{b}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": line}) + "\n"
            for i in range(200)
        )
        f = client.files.create(file=("in.jsonl", io.BytesIO(data.encode())), purpose="batch")
        ids.append(
            client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        )
    r = redis_lib.Redis.from_url(core.redis_url)
    peak = peak_slots = 0
    while True:
        # One snapshot (MULTI): read batch by batch, a line of one batch could end and a
        # line of the other take its slot between the reads, and be counted twice (the
        # test read 100 in CI that way).
        with r.pipeline(transaction=True) as pipe:
            for batch_id in ids:
                pipe.hget(f"llmq:batch:{batch_id}", "n_dispatched")
                for s in ("completed", "failed", "cancelled"):
                    pipe.scard(f"llmq:batch:{batch_id}:{s}")
            pipe.scard(f"llmq:batch-slots:{MODEL}")
            snap = pipe.execute()
        in_flight = sum(int(snap[4 * b] or 0) - sum(snap[4 * b + 1 : 4 * b + 4]) for b in range(len(ids)))
        peak, peak_slots = max(peak, in_flight), max(peak_slots, snap[-1])
        if all(client.batches.retrieve(i).status == "completed" for i in ids):
            break
        time.sleep(0.02)
    print(f"\npeak batch lines in flight: {peak}, slots held: {peak_slots}, of 96")
    assert 0 < peak <= peak_slots <= 96
    for batch_id in ids:
        counts = client.batches.retrieve(batch_id).request_counts
        assert (counts.total, counts.completed, counts.failed) == (200, 200, 0)
    assert r.scard(f"llmq:batch-slots:{MODEL}") == 0


async def test_a_burst_of_streams_gets_no_503s_with_redis_healthy(core):
    """300 streams at once: each gets its whole answer. With redis-py's default pool (100
    connections, then "Too many connections") 187 of 300 were refused with a 503
    "cannot reach Redis" while Redis was fine."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 64, "stream": True}
    outcomes: collections.Counter[str] = collections.Counter()

    async def one(h: httpx.AsyncClient) -> None:
        async with h.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                outcomes[f"{resp.status_code} {resp.text[:80]}"] += 1
                return
            lines = [line async for line in resp.aiter_lines()]
            outcomes["done" if "data: [DONE]" in lines else "no [DONE]"] += 1

    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=core.api_url, timeout=120, limits=limits) as h:
        await asyncio.gather(*(one(h) for _ in range(300)))
    assert outcomes == {"done": 300}, outcomes
