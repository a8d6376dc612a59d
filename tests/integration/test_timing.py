"""The benchmark's stage stamps (BENCH_TIMING, common/timing.py) on real processes (Redis,
a Celery worker with the fake engine, the API): a streamed job leaves every stamp of the
API and the worker in its timing hash, in the order the job passed them; with
BENCH_TIMING off nothing is written."""

from __future__ import annotations

import sys
import time

import httpx
import pytest
import redis as redis_lib

from common import keys, timing

sys.path.insert(0, "scripts")
from stack import Stack, free_port  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 8,
    "stream": True,
}
# What the API and the worker stamp (the client's own `sent` and `client` aside).
SERVER_STAMPS = [s for s in timing.STAMPS if s not in ("sent", "client")]


def fake_stack(tmp_path_factory: pytest.TempPathFactory, name: str, bench_timing: str) -> Stack:
    logs = tmp_path_factory.mktemp(name)
    env = {"ENGINE": "fake", "FAKE_STEP_SECONDS": "0.01", "BENCH_TIMING": bench_timing}
    s = Stack(redis_port=free_port(), api_port=free_port(), flower_port=None, log_dir=logs, env=env)
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.wait_ready(MODEL, timeout=120)
    except BaseException:
        s.stop()
        raise
    return s


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory):
    s = fake_stack(tmp_path_factory, "timing-on-logs", "1")
    yield s
    s.stop()


def stream(s: Stack) -> str:
    """One streamed chat request to its end; its job id."""
    with (
        httpx.Client(base_url=s.api_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=BODY) as resp,
    ):
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert any('"content":"' in line and '"content":""' not in line for line in lines)
        return resp.headers["x-request-id"]


def stamps_of(s: Stack, job_id: str, want: list[str], timeout: float = 10) -> dict[str, float]:
    """The job's timing hash once it holds `want` (the API and the worker write theirs
    after the stream and the job end), or what it holds after `timeout`."""
    r = redis_lib.Redis.from_url(s.redis_url)
    deadline = time.monotonic() + timeout
    while True:
        got = {keys.text(k): float(v) for k, v in r.hgetall(keys.job_timing(job_id)).items()}
        if set(want) <= set(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_a_streamed_job_leaves_every_stamp_in_order(timed: Stack) -> None:
    job_id = stream(timed)
    got = stamps_of(timed, job_id, SERVER_STAMPS)
    assert sorted(got) == sorted(SERVER_STAMPS), got
    # The path to the first token, one stamp after the other (one machine, one clock).
    chain = [
        "arrived",
        "submit",
        "admitted",
        "prepared",
        "recorded",
        "subscribed",
        "received",
        "loop",  # the job starts as its message arrives; a slot thread's task waits for it
        "claimed",
        "engine_in",
        "engine_first",
        "publish",
        "relayed",
        "sse",
    ]
    times = [got[name] for name in chain]
    assert times == sorted(times), dict(zip(chain, times, strict=True))
    assert got["recorded"] <= got["queued"] and got["publish"] <= got["published"]
    assert got["received"] <= got["task"]
    durations = timing.stage_durations(got | {"sent": got["arrived"], "client": got["sse"]})
    assert all(d >= 0 for name, d in durations.items() if not name.startswith("(")), durations


def test_stamps_are_per_job_and_taken_from_memory(timed: Stack) -> None:
    first, second = stream(timed), stream(timed)
    a, b = stamps_of(timed, first, SERVER_STAMPS), stamps_of(timed, second, SERVER_STAMPS)
    assert set(a) == set(b) == set(SERVER_STAMPS)
    # The second job's stamps are its own: each stage noted when that job passed it.
    assert all(b[name] > a[name] for name in SERVER_STAMPS)


def test_nothing_is_written_without_bench_timing(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = fake_stack(tmp_path_factory, "timing-off-logs", "")
    try:
        job_id = stream(s)
        time.sleep(0.5)  # after the job's end, where the stamps would have been written
        r = redis_lib.Redis.from_url(s.redis_url)
        assert r.keys(keys.job_timing("*")) == []
        assert r.exists(keys.job(job_id))
    finally:
        s.stop()
